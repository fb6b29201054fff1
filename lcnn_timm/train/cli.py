"""``lcnn-timm train --config configs/X.yaml [--key value ...]`` (launch with torchrun for DDP)."""
import argparse
import dataclasses
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


def _resume_command(argv: List[str]) -> str:
    """The command line that continues this run (torchrun launches are left to the user to repeat)."""
    has_resume = any(a == "--resume" or a.startswith("--resume=") for a in argv)
    return shlex.join(["lcnn-timm", "train", *argv, *([] if has_resume else ["--resume"])])


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


def prepare(argv: List[str]) -> Tuple[Optional[int], Any]:
    """The torch-free part of the command: parse, answer ``--help`` / ``--print-config``, validate the config and
    its paths (:func:`~lcnn_timm.train.paths.preflight`).

    Returns ``(exit status, None)`` when the command is answered (help, printed config, a usage or config
    error) and ``(None, config)`` when training should start. Needs only this module and ``config`` (stdlib and
    yaml), so the ``lcnn-timm`` dispatcher runs it before importing torch (answers in well under a second).
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

    problem = preflight(cfg)  # data folder, output folder, resume target: before torch, in well under a second
    if problem:
        print(f"lcnn-timm train: {problem}", file=sys.stderr)
        return USAGE_ERROR, None
    return None, cfg


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code, cfg = prepare(argv)
    if code is not None:
        return code
    from .trainer import CheckpointWriteError, NonFiniteLossError, TrainingInterrupted, TrainSetupError, output_dir, train

    try:
        result = train(cfg)
    except TrainSetupError as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return USAGE_ERROR
    except NonFiniteLossError as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return NON_FINITE
    except CheckpointWriteError as error:
        print(f"lcnn-timm train: {error}", file=sys.stderr)
        return WRITE_FAILED
    except TrainingInterrupted as error:
        hint = f"; resume with:\n  {_resume_command(argv)}" if error.checkpoint else ""
        print(f"lcnn-timm train: {error}{hint}", file=sys.stderr)
        return 128 + signal.Signals.__members__.get(error.signal_name, signal.SIGINT).value
    except KeyboardInterrupt:  # before training started: nothing was written
        print("lcnn-timm train: interrupted before training started; nothing was written", file=sys.stderr)
        return 128 + signal.SIGINT
    _print_outputs(output_dir(cfg), result)
    return 0

