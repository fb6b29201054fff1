"""Running under timm's own ``train.py``: say which config keys it ignores.

``train.py`` loads a YAML with ``parser.set_defaults(**cfg)``, so keys it has no argument for (``beta_weight``,
``precise_bn_batches``, ``crop_padding``, ...) are carried along and silently unused. Its ``device_modules:
[lcnn_timm]`` imports this package after parsing, which is where :func:`warn_ignored_config_keys` looks at the
running script and, if it is timm's ``train.py``, logs the keys it will not apply.
"""
import argparse
import logging
import sys
from types import ModuleType
from typing import List, Optional

import yaml

__all__ = ["ignored_config_keys", "warn_ignored_config_keys"]

_LOGGER = logging.getLogger("lcnn_timm")


def ignored_config_keys(script: ModuleType, argv: List[str]) -> Optional[List[str]]:
    """The config keys that timm's ``train.py`` (``script``, run with ``argv``) has no argument for; None when
    ``script`` is not that script or no readable config was given."""
    config_parser, parser = getattr(script, "config_parser", None), getattr(script, "parser", None)
    if not (isinstance(config_parser, argparse.ArgumentParser) and isinstance(parser, argparse.ArgumentParser)
            and callable(getattr(script, "_parse_args", None))):
        return None
    try:
        path = config_parser.parse_known_args(argv)[0].config
        if not path:
            return None
        with open(path) as f:
            config = yaml.safe_load(f)
    except (AttributeError, OSError, yaml.YAMLError, SystemExit):
        return None
    if not isinstance(config, dict):
        return None
    known = {action.dest for action in parser._actions}
    return sorted(key for key in config if key not in known)


def warn_ignored_config_keys(script: Optional[ModuleType] = None, argv: Optional[List[str]] = None) -> None:
    """Log a warning naming the config keys timm's ``train.py`` will not apply (nothing under any other script)."""
    script = sys.modules.get("__main__") if script is None else script
    ignored = ignored_config_keys(script, sys.argv[1:] if argv is None else argv) if script is not None else None
    if ignored:
        _LOGGER.warning(
            "timm's train.py ignores these config keys: %s. `lcnn-timm train` applies them; under train.py the "
            "beta/gamma penalty applies only through model_kwargs.curvature_penalty (docs/training.md, "
            "'With timm's train.py').", ", ".join(ignored))
