"""The ``lcnn-timm`` command's dispatcher, outside the ``lcnn_timm`` package so that ``--help`` and ``--version``
answer at once: importing ``lcnn_timm`` imports torch and timm (seconds of CPU). Each sub-command's module is
imported only when that sub-command runs.

``lcnn-timm train`` answers ``--help``, ``--print-config`` and every usage, config or path error before torch too:
:func:`lcnn_timm.train.cli.prepare` and the config schema it reads use only the standard library and yaml, and
are loaded here from the package's files without running the package's ``__init__`` (which registers the
models with timm): stand-in packages whose paths are the real ones. ``tests/test_cli_conventions.py``
checks that torch stays unimported on that path.
"""
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import List, Optional

__all__ = ["COMMANDS", "main", "regenerate_help", "render_help"]

# sub-command -> (module with ``main(argv) -> int``, one-line help)
COMMANDS = {
    "train": ("lcnn_timm.train.cli", "train a model from a timm-format YAML config"),
    "evaluate": ("lcnn_timm.evaluation.cli", "measure accuracy, curvature and robustness; write results.json"),
    "push": ("lcnn_timm.hub.cli", "write a timm-layout Hub repository (model card included) and upload it"),
    "reproduce": ("lcnn_timm.zoo", "train, evaluate and publish every configs/ row of the paper's table"),
}


def _usage() -> str:
    lines = ["usage: lcnn-timm COMMAND [options]", "       lcnn-timm --version", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'lcnn-timm COMMAND --help' for a command's options.",
              "Start here: lcnn-timm train --config configs/fashion_mnist_quick.yaml"]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lcnn-timm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"lcnn-timm {_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"lcnn-timm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if command == "train":
        code, _ = _torch_free_train_cli().prepare(rest)
        if code is not None:  # answered without torch: help, printed config, a usage or config error
            return code
    elif any(arg in ("-h", "--help") for arg in rest):
        from ._help import HELP  # generated from the real parsers; a test fails when it is stale

        print(HELP[command], end="")
        return 0
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


_STAND_IN = "lcnn_timm_cli._front"


def _torch_free_train_cli() -> types.ModuleType:
    """``lcnn_timm/train/cli.py`` loaded inside stand-in packages mirroring ``lcnn_timm``, ``lcnn_timm.train`` and
    ``lcnn_timm.data`` (relative imports find the stdlib-only modules they need: ``config``, ``paths``,
    ``data/names``) without running the real packages' ``__init__``."""
    if _STAND_IN not in sys.modules:
        spec = importlib.util.find_spec("lcnn_timm")  # locates the package without importing it
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, folder in ((_STAND_IN, root), (f"{_STAND_IN}.train", root / "train"),
                             (f"{_STAND_IN}.data", root / "data")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    return importlib.import_module(f"{_STAND_IN}.train.cli")
