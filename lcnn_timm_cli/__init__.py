"""The ``lcnn-timm`` command's dispatcher, outside the ``lcnn_timm`` package so that ``--help`` and ``--version``
answer at once: importing ``lcnn_timm`` imports torch and timm (seconds of CPU). Each sub-command's module is
imported only when that sub-command runs."""
import importlib
import sys
from typing import List, Optional

__all__ = ["COMMANDS", "main"]

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
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)
