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

# exit status of a command stopped by Ctrl-C (SIGINT), as a shell reports it
INTERRUPTED = 130
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
    lock = None
    if command == "train":
        code, prepared = _torch_free("cli").prepare(rest)
        if code is not None:  # answered without torch: help, printed config, a usage, config or path error
            return code
        lock = prepared[1]  # the run folder's, taken before torch: held by this process until training ends
    elif any(arg in ("-h", "--help") for arg in rest):
        from ._help import HELP  # generated from the real parsers; a test fails when it is stale

        print(HELP[command], end="")
        return 0
    else:
        problem = _path_problem(command, rest)
        if problem:  # a missing input or an unwritable output, said before torch is imported
            print(f"lcnn-timm {command}: {problem}", file=sys.stderr)
            return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
    except KeyboardInterrupt:  # importing torch takes seconds: a Ctrl-C there needs no traceback either
        print(f"lcnn-timm {command}: interrupted before it started; nothing was written", file=sys.stderr)
        return INTERRUPTED
    return int((module.main(rest, lock=lock) if lock is not None else module.main(rest)) or 0)


_STAND_IN = "lcnn_timm_cli._front"


def _torch_free(module: str) -> types.ModuleType:
    """``lcnn_timm/train/<module>.py`` (``cli`` or ``paths``) loaded inside stand-in packages mirroring
    ``lcnn_timm``, ``lcnn_timm.train`` and ``lcnn_timm.data`` (relative imports find the stdlib-only modules they
    need: ``config``, ``paths``, ``data/names``) without running the real packages' ``__init__``."""
    if _STAND_IN not in sys.modules:
        spec = importlib.util.find_spec("lcnn_timm")  # locates the package without importing it
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, folder in ((_STAND_IN, root), (f"{_STAND_IN}.train", root / "train"),
                             (f"{_STAND_IN}.data", root / "data")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    return importlib.import_module(f"{_STAND_IN}.train.{module}")


# the path arguments of the commands other than train (which checks its config's paths itself), checked before
# torch is imported: an input that must exist, or an output file / folder that must be writable
PATH_ARGUMENTS = {
    "evaluate": {"--checkpoint": "input", "--data-dir": "input", "--out": "output file"},
    "push": {"checkpoint": "input", "--results": "input", "--config": "input", "--label-names": "input",
             "--out": "output folder"},
    "reproduce": {"--configs-dir": "input", "--data-dir": "input"},
}


def _path_problem(command: str, argv: List[str]) -> Optional[str]:
    """The first missing input or unwritable output among ``command``'s path arguments, or None."""
    import argparse

    kinds = PATH_ARGUMENTS.get(command, {})
    parser = argparse.ArgumentParser(add_help=False)
    for option in kinds:
        parser.add_argument(option, **({} if option.startswith("--") else {"nargs": "?"}))
    try:
        args, _ = parser.parse_known_args(argv)
    except SystemExit:  # a malformed line: the command's own parser will say how
        return None
    paths = _torch_free("paths")
    for option, kind in kinds.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if kind == "input" and not Path(value).exists():
            return f"{option} {value} does not exist"
        if kind.startswith("output"):
            reason = (paths.unwritable_reason(Path(value)) if kind == "output folder"
                      else paths.output_file_reason(Path(value)))
            if reason:
                return f"{option} {value}: {reason}"
    return None


HELP_WIDTH = 100  # columns the stored help texts are formatted for


def render_help(command: str) -> str:
    """``lcnn-timm COMMAND --help`` as the command's own parser prints it (imports the command: torch)."""
    import contextlib
    import io
    import os

    module = importlib.import_module(COMMANDS[command][0])
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)  # argparse wraps to the terminal's width
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            module._parser().print_help()
        return out.getvalue()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def regenerate_help() -> None:
    """Rewrite ``_help.py``, the stored ``--help`` of every command but ``train`` (which answers torch-free)."""
    texts = {command: render_help(command) for command in COMMANDS if command != "train"}
    body = "".join(f"    {command!r}: {text!r},\n" for command, text in texts.items())
    (Path(__file__).parent / "_help.py").write_text(
        '"""Generated by lcnn_timm_cli.regenerate_help() from the commands\' own parsers: --help without importing '
        'torch.\n\ntests/test_cli_conventions.py fails when a parser changes and this file is stale."""\n'
        f"HELP = {{\n{body}}}\n")
