"""``python -m lcnn_timm.cli`` (e.g. under torchrun): the ``lcnn-timm`` command, whose dispatcher lives in
:mod:`lcnn_timm_cli` so that ``lcnn-timm --help`` need not import torch."""
import sys

from lcnn_timm_cli import COMMANDS, main

__all__ = ["COMMANDS", "main"]

if __name__ == "__main__":
    sys.exit(main())
