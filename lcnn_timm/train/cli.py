"""``lcnn-timm train --config configs/X.yaml [--key value ...]`` (launch with torchrun for DDP)."""
import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcnn-timm train",
        description="Train a model from a timm train.py-format YAML config. Any config key can be overridden as "
                    "--key value (dashes or underscores); --resume alone continues the output folder's run.",
    )
    parser.add_argument("-c", "--config", default=None, help="YAML config file (timm train.py key names + LCNN keys)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from .config import load_config, parse_overrides

    args, rest = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, parse_overrides(rest))
    except (ValueError, FileNotFoundError) as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(vars(cfg), sort_keys=False))
        return 0
    from .trainer import NonFiniteLossError, train

    try:
        result = train(cfg)
    except NonFiniteLossError as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return 3
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    return 0
