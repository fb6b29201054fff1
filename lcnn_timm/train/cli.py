"""``lcnn-timm train --config configs/X.yaml [--key value ...]`` (launch with torchrun for DDP)."""
import argparse
import dataclasses
import os
import shlex
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any, List, Optional, Tuple

__all__ = ["main", "prepare"]

# exit statuses: 2 a usage or set-up error (nothing written), 3 a non-finite loss, 128 + N killed by signal N
USAGE_ERROR, NON_FINITE, WRITE_FAILED = 2, 3, 4
# the end of a run says when the saved normalised layers are further than this from norm 1
NORM_LAG_NOTE_ABOVE = 1e-3


def _keys_help() -> str:
    """Every config key with its default, for ``--help`` (the descriptions are in docs/training.md)."""
    from .config import AUTO_KEYS, TIMM_PIPELINE_KEYS, TrainConfig

    entries = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        entries.append(f"{f.name}={'auto' if f.name in AUTO_KEYS else default!r}")
    paragraphs = [
        ("config keys (a YAML key, or --key value on the command line), with their defaults:", " ".join(entries)),
        ("accepted and ignored (timm train.py's PIL pipeline):", ", ".join(sorted(TIMM_PIPELINE_KEYS))),
        ("exit status:", "0 done, 2 bad config, data, checkpoint or output folder (nothing written), 3 non-finite loss, "
                         "4 a checkpoint could not be written (full disk; the previous one is kept), 130/143 "
                         "stopped by SIGINT/SIGTERM (checkpoint saved; rerun with --resume)"),
    ]
    wrap = textwrap.TextWrapper(100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(f"{title}\n{wrap.fill(body)}" for title, body in paragraphs)


class _EpilogAsIs(argparse.HelpFormatter):
    """Wraps the description and options as usual, but keeps the epilog's own line breaks."""

    def add_text(self, text):
        if text is not None and "\n" in text:
            self._add_item(lambda: text + "\n", [])
        else:
            super().add_text(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lcnn-timm train",
        description="Train a model from a timm train.py-format YAML config; any config key can be overridden as "
                    "--key value (dashes or underscores). Ctrl-C (or SIGTERM) saves a checkpoint at the current "
                    "step and prints the command that resumes it.",
        epilog=_keys_help(), formatter_class=_EpilogAsIs,
    )
    parser.add_argument("-c", "--config", default=None,
                        help="YAML config file (timm train.py key names + LCNN keys), e.g. "
                             "configs/fashion_mnist_quick.yaml")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH|auto",
                        help="continue the output folder's run from its last checkpoint (an error if there is "
                             "none); 'auto': continue if there is one, else start; PATH: a checkpoint folder or "
                             ".safetensors file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def _primary() -> bool:
    """Whether this process is rank 0 (or the only one): the one that speaks for the run."""
    return os.environ.get("RANK", "0") == "0"


def _launcher() -> List[str]:
    """The command line of this process's parent (torchrun's, under torchrun), or [] where it cannot be read."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def _launch(argv: List[str], launcher: Optional[List[str]] = None) -> List[str]:
    """How this process was started, up to ``argv``: ``lcnn-timm train``, or under torchrun the ``launcher``'s
    command line (default :func:`_launcher`: ``torchrun --nproc_per_node 2 -m lcnn_timm.cli train``); where that does
    not end with ``argv``, a torchrun command with this launch's node and process counts."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return ["lcnn-timm", "train"]
    launcher = _launcher() if launcher is None else launcher
    if argv and launcher[len(launcher) - len(argv):] == argv:
        launch = launcher[:len(launcher) - len(argv)]
        # the torchrun script runs as "python .../bin/torchrun": give it back as the user typed it
        return ["torchrun", *launch[2:]] if len(launch) > 1 and Path(launch[1]).name == "torchrun" else launch
    return ["torchrun", "--nnodes", os.environ.get("GROUP_WORLD_SIZE", "1"), "--nproc_per_node",
            os.environ.get("LOCAL_WORLD_SIZE", "1"), "-m", "lcnn_timm.cli", "train"]


def _resume_command(argv: List[str]) -> str:
    """The command line that continues this run: the same launch (torchrun's too), with ``--resume``."""
    has_resume = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    return shlex.join([*_launch(argv), *argv, *([] if has_resume else ["--resume"])])


def _print_outputs(out_dir: Path, result: dict) -> None:
    acc = f"{result['test_acc']:.2%} clean test accuracy on {result['test_images']} images ({result['bn']})"
    ema = f"; EMA weights {result['test_ema_acc']:.2%}" if "test_ema_acc" in result else ""
    print(f"done: {acc}{ema}; trained in {result['precision']}")
    if result.get("normalized_layer_norm_max", 1.0) > 1 + NORM_LAG_NOTE_ABOVE:
        print(f"note: the spectrally normalised layers evaluate with operator norms up to "
              f"{result['normalized_layer_norm_max']:.4f}, not 1 (the training's power iteration lagged the weights); "
              f"precise_bn_batches converges them before the final evaluation")
    files = ["model.safetensors (final weights)", "final_eval.json", "metrics.jsonl", "*.png (curves)",
             "ckpt-*.safetensors + .state.pt (resume state)", "config.json"]
    print(f"outputs in {out_dir}/: {', '.join(files)}")


def prepare(argv: List[str], lock: Any = None) -> Tuple[Optional[int], Any]:
    """The torch-free part of the command: parse, answer ``--help`` / ``--print-config``, validate the config and
    its paths and lock the run folder (rank 0; :func:`~lcnn_timm.train.paths.preflight`).

    Returns ``(exit status, None)`` when the command is answered (help, printed config, a usage, config or path
    error, a folder another run holds) and ``(None, (config, lock))`` when training should start: ``lock`` (None
    on ranks other than 0) is then held, for the trainer to take over. A ``lock`` passed in is the one an earlier
    call took for this command (the dispatcher's): the folder is not locked again. Needs only the standard
    library and yaml, so the ``lcnn-timm`` dispatcher runs it before importing torch (well under a second).
    """
    from .config import load_config, parse_overrides

    try:
        args, rest = _parser().parse_known_args(argv)
    except SystemExit as exit_:  # --help (0) or an argparse usage error (2)
        return int(exit_.code or 0), None
    if args.config is None:
        print("lcnn-timm train: no --config given: pass a YAML, e.g. --config configs/fashion_mnist_quick.yaml "
              "(keys can then be overridden as --key value)", file=sys.stderr)
        return USAGE_ERROR, None
    try:
        overrides = parse_overrides(rest)
        if args.resume is not None:
            overrides["resume"] = args.resume
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return USAGE_ERROR, None
    if args.print_config:
        import yaml

        print(yaml.safe_dump(vars(cfg), sort_keys=False))
        return 0, None
    from .paths import preflight

    # output folder, its lock, data folder, resume target: before torch, in well under a second
    problem, lock = (None, lock) if lock is not None else preflight(cfg, _primary())
    if problem:
        print(f"lcnn-timm train: {problem}", file=sys.stderr)
        return USAGE_ERROR, None
    return None, (cfg, lock)


def _say(message: str, every_rank: bool = False) -> None:
    """One line on stderr, from rank 0 only unless ``every_rank`` (under DDP the ranks fail alike)."""
    if every_rank or _primary():
        print(f"lcnn-timm train: {message}", file=sys.stderr)


def main(argv: Optional[List[str]] = None, lock: Any = None) -> int:
    """``lcnn-timm train``; ``lock``: the run folder's, taken by the dispatcher's torch-free :func:`prepare`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    code, prepared = prepare(argv, lock)
    if code is not None:
        return code
    cfg, lock = prepared
    from .trainer import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted, TrainSetupError, output_dir, train

    try:
        result = train(cfg, lock)
    except TrainSetupError as error:
        _say(str(error), every_rank=error.local)
        return USAGE_ERROR
    except NonFiniteLossError as error:
        _say(str(error))
        return NON_FINITE
    except CheckpointWriteError as error:  # rank 0 writes, so only rank 0 raises it
        _say(str(error), every_rank=True)
        return WRITE_FAILED
    except TrainingInterrupted as error:
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
        where = f" (the same command on each of the {nodes} nodes)" if nodes > 1 else ""
        hint = f"; resume with{where}:\n  {_resume_command(argv)}" if error.checkpoint else ""
        _say(f"{error}{hint}")
        return 128 + signal.Signals.__members__.get(error.signal_name, signal.SIGINT).value
    except KeyboardInterrupt:  # before training started: nothing was written
        _say("interrupted before training started; nothing was written")
        return 128 + signal.SIGINT
    if _primary():
        _print_outputs(output_dir(cfg), result)
    return 0

