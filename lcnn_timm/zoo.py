"""``lcnn-timm reproduce``: the paper's ResNet-18 table, end to end, from the package's own configs and CLIs.

For every row (``configs/<zoo>_<row>.yaml``): train it with ``lcnn-timm train`` (resumed if interrupted,
skipped if finished), evaluate the final weights with ``lcnn-timm evaluate`` on the test split, and stage the
two LCNN rows as Hub repositories under ``output/reproduce/hub_cards/<arch>.<tag>/`` (``--push`` uploads them).
Then write the comparison beside the per-row results in ``output/reproduce/<zoo>/``: ``table.md`` (measured
numbers next to the paper's CIFAR-100 numbers, training cost relative to the Standard row), ``summary.json`` and
``curvature_vs_robustness.png``. ``--publish`` writes into the checked-in ``hub_cards/`` instead.

Every step writes its outputs atomically, so an interrupted run is continued by running the same command again;
Ctrl-C (the training saves a checkpoint first) exits with status 130 and prints that command.
"""
import argparse
import json
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["PAPER_RESULTS", "ROWS", "ZOOS", "ReproduceInterrupted", "Row", "Zoo", "main", "reproduce",
           "training_seconds"]


@dataclass(frozen=True)
class Row:
    """One row of the table: ``configs/<zoo>_<key>.yaml``; published rows get the Hub tag ``<zoo tag><suffix>``.
    Rows outside the paper's table (``paper=False``) run only when ``--rows`` names them."""

    key: str
    label: str
    tag_suffix: Optional[str] = None
    paper: bool = True


ROWS = (
    Row("standard", "Standard"),
    Row("lcnn", "LCNN", tag_suffix=""),
    Row("gradreg", "GradReg"),
    Row("lcnn_gradreg", "LCNN + GradReg", tag_suffix="_gradreg"),
    Row("hessianreg", "HessianReg (CURE)"),
    Row("adversarial", "Adversarial training"),
    # a trained ReLU model converted and fine-tuned (issue 24): relu must run before convert, which loads its weights
    Row("relu", "ReLU (conversion source)", paper=False),
    Row("convert", "ReLU converted + 1 epoch LCNN", paper=False),
)


@dataclass(frozen=True)
class Zoo:
    """A dataset's version of the table: its configs' prefix, evaluation dataset, PGD radii and Hub tag."""

    name: str
    dataset: str
    pgd_eps: Tuple[float, ...]
    tag: str


ZOOS = {
    # the paper's L2 radii for 3x32x32 CIFAR-100
    "cifar100": Zoo("cifar100", "cifar100", (0.05, 0.1, 0.15, 0.2), "cifar100"),
    # 1x28x28 Fashion-MNIST is far more robust at a given L2 radius: these spread the rows from mild to severe
    "fashion_mnist": Zoo("fashion_mnist", "fashion_mnist", (0.1, 0.25, 0.5, 1.0), "fmnist"),
}

# the paper's ResNet-18 / CIFAR-100 numbers (Table 1 and the L2-PGD table; PGD at eps 0.05, 0.1, 0.15, 0.2)
PAPER_RESULTS = {
    "standard": {"accuracy": 77.42, "curvature": 270.89, "pgd": (59.97, 37.55, 23.41, 16.11)},
    "lcnn": {"accuracy": 77.30, "curvature": 69.50, "pgd": (61.17, 39.72, 25.60, 17.66)},
    "gradreg": {"accuracy": 77.20, "curvature": 89.47, "pgd": (71.90, 61.06, 49.19, 38.09)},
    "lcnn_gradreg": {"accuracy": 77.29, "curvature": 25.30, "pgd": (72.68, 63.36, 52.96, 42.70)},
    "hessianreg": {"accuracy": 76.48, "curvature": 116.31, "pgd": (71.39, 61.28, 49.60, 39.04)},
    "adversarial": {"accuracy": 76.96, "curvature": 63.79, "pgd": (72.76, 64.70, 54.80, 44.98)},
}

EVAL_METRICS = ("accuracy", "curvature", "pgd", "gradient_stability")
# where a run writes unless --publish: ignored by git, so the checked-in zoo is never mixed with a new run's rows
DEFAULT_OUTPUT = Path("output") / "reproduce"
# the checked-in zoo: hub_cards/<arch>.<tag>/ and hub_cards/results/<zoo>/
PUBLISHED_HUB_CARDS = Path("hub_cards")
# exit statuses of a train or evaluate stopped by SIGINT / SIGTERM (after saving what it had)
_SIGNAL_EXITS = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class ReproduceInterrupted(Exception):
    """A signal stopped a row's training or evaluation, which kept what it had; ``code`` is the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lcnn-timm reproduce", description=__doc__.split("\n\n")[0].replace("``", "'"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", choices=sorted(ZOOS), default="cifar100", help="which dataset's table (default cifar100)")
    p.add_argument("--rows", default=",".join(r.key for r in ROWS if r.paper),
                   help="comma-separated rows to run (default: the paper's six, Standard first; Fashion-MNIST also "
                        "has relu,convert: a trained ReLU model converted)")
    p.add_argument("--configs-dir", default="configs", help="folder holding <zoo>_<row>.yaml")
    p.add_argument("--data-dir", help="dataset folder, for training and evaluation (default: each config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training-config key in every row (repeatable), e.g. --set epochs=1")
    p.add_argument("--results-dir", help=f"where results and the comparison go (default {DEFAULT_OUTPUT}/<zoo>; "
                                         f"with --publish {PUBLISHED_HUB_CARDS}/results/<zoo>)")
    p.add_argument("--hub-cards-dir", help=f"where the LCNN rows' Hub repositories are staged (default "
                                           f"{DEFAULT_OUTPUT}/hub_cards; with --publish {PUBLISHED_HUB_CARDS})")
    p.add_argument("--publish", action="store_true",
                   help=f"write results and staged repositories into the checked-in {PUBLISHED_HUB_CARDS}/, "
                        "adding to and replacing its rows")
    p.add_argument("--hub-org", default=None, help="Hub organisation of the staged repositories (default lcnn-timm)")
    p.add_argument("--push", action="store_true", help="upload the staged repositories (needs a Hugging Face token)")
    p.add_argument("--eval-count", type=int, help="test images for clean accuracy (default: the whole split)")
    p.add_argument("--costly-count", type=int, default=1000,
                   help="test images for curvature, PGD and gradient stability (default 1000)")
    p.add_argument("--curvature-iterations", type=int, help="Lanczos steps per image (default: the evaluator's)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--device", help="evaluation device (default: cuda if available)")
    return p


def _train_argv(config: Path, overrides: Sequence[str], data_dir: Optional[str]) -> List[str]:
    argv = ["--config", str(config), "--resume", "auto"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        argv += [f"--{key}", value]
    if data_dir:
        argv += ["--data-dir", data_dir]
    return argv


def _model_kwargs(cfg: Any) -> Dict[str, Any]:
    return {**(cfg.model_kwargs or {}), "num_classes": cfg.num_classes, "in_chans": cfg.in_chans}


def training_seconds(run_dir: Path) -> float:
    """Time spent in training steps: the sum of the run's per-epoch ``epoch_seconds``."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float(sum(row["epoch_seconds"] for row in rows))


def _evaluation_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    return set(EVAL_METRICS) <= set(json.loads(path.read_text()).get("metrics", {}))


def _check_step(code: int, step: str) -> None:
    """Raise if a train or evaluate step did not finish: :class:`ReproduceInterrupted` if a signal stopped it."""
    if code in _SIGNAL_EXITS:
        raise ReproduceInterrupted(f"{step} was interrupted", code)
    if code != 0:
        raise RuntimeError(f"{step} failed (see the message above); fix it and run the same command again to resume")


def _run_row(row: Row, zoo: Zoo, args: argparse.Namespace, results_dir: Path) -> Dict[str, Any]:
    from .evaluation.cli import main as evaluate_main
    from .train.cli import main as train_main
    from .train.config import load_config, parse_overrides
    from .train.trainer import output_dir

    config = Path(args.configs_dir) / f"{zoo.name}_{row.key}.yaml"
    train_argv = _train_argv(config, args.overrides, args.data_dir)
    cfg = load_config(str(config), parse_overrides(train_argv[2:]))
    run_dir = output_dir(cfg)
    if not (run_dir / "final_eval.json").is_file():
        print(f"[{row.key}] training {config} -> {run_dir}", flush=True)
        _check_step(train_main(train_argv), f"training {config}")
    else:
        print(f"[{row.key}] already trained: {run_dir}", flush=True)

    out = results_dir / row.key / "results.json"
    if not _evaluation_complete(out):
        print(f"[{row.key}] evaluating -> {out}", flush=True)
        eval_argv = [cfg.model, "--checkpoint", str(run_dir / "model.safetensors"),
                     "--model-kwargs", *[f"{k}={json.dumps(v)}" for k, v in _model_kwargs(cfg).items()],
                     "--dataset", f"{zoo.dataset}:test", "--metrics", ",".join(EVAL_METRICS),
                     "--costly-count", str(args.costly_count), "--pgd-eps", ",".join(map(str, zoo.pgd_eps)),
                     "--pgd-steps", str(args.pgd_steps), "--out", str(out)]
        if cfg.convert:
            eval_argv.append("--convert")
        if args.curvature_iterations is not None:
            eval_argv += ["--curvature-iterations", str(args.curvature_iterations)]
        if args.data_dir or cfg.data_dir:
            eval_argv += ["--data-dir", args.data_dir or cfg.data_dir]
        if args.eval_count:
            eval_argv += ["--count", str(args.eval_count)]
        if args.device:
            eval_argv += ["--device", args.device]
        _check_step(evaluate_main(eval_argv), f"evaluating {row.key}")
    shutil.copyfile(config, results_dir / row.key / "train.yaml")
    summary = {"row": row.key, "label": row.label, "model": cfg.model, "config": str(config),
               "train_seconds": training_seconds(run_dir), "epochs": cfg.epochs,
               "results": str(out.relative_to(results_dir))}
    if row.tag_suffix is not None:
        summary["hub_repo"] = _stage(row, zoo, cfg, run_dir, out, config, args)
    return summary


def _stage(row: Row, zoo: Zoo, cfg: Any, run_dir: Path, results: Path, config: Path, args: argparse.Namespace) -> str:
    from .hub import push_checkpoint
    from .models._pretrained import HUB_ORG

    name = f"{cfg.model}.{zoo.tag}{row.tag_suffix}"
    repo_id = f"{args.hub_org or HUB_ORG}/{name}"
    folder = _output_dirs(args, zoo)[1] / name
    print(f"[{row.key}] staging {folder}" + (f" and pushing {repo_id}" if args.push else ""), flush=True)
    push_checkpoint(run_dir / "model.safetensors", name, repo_id, results=results, train_config=config,
                    out_dir=folder, dry_run=not args.push, **_model_kwargs(cfg))
    return repo_id


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def comparison_table(zoo: Zoo, summaries: List[Dict[str, Any]], results_dir: Path) -> str:
    """Markdown: measured numbers of each row beside the paper's CIFAR-100 ones, and the relative training cost."""
    standard = next((s for s in summaries if s["row"] == "standard"), None)
    eps = ", ".join(f"{e:g}" for e in zoo.pgd_eps)
    lines = [
        f"| Row | Acc (%) | E C_f | E ‖∇f‖ | E ‖∇²f‖ | L2 PGD acc (%) at ε = {eps} | training cost vs Standard "
        "| paper (CIFAR-100): Acc, E C_f, PGD at ε = 0.05, 0.1, 0.15, 0.2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        metrics = json.loads((results_dir / s["results"]).read_text())["metrics"]
        curvature = metrics["curvature"]
        cf, gn, hn = (curvature.get(k, {}) for k in ("curvature", "gradient_norm", "hessian_norm"))
        pgd = " / ".join(_fmt(r["accuracy"], ".1f") for r in metrics["pgd"])
        cost = f"{s['train_seconds'] / standard['train_seconds']:.2f}x" if standard else "–"
        paper = PAPER_RESULTS.get(s["row"])
        paper_text = (f"{paper['accuracy']:.2f}, {paper['curvature']:.1f}, {' / '.join(f'{v:.1f}' for v in paper['pgd'])}"
                      if paper else "–")
        lines.append(
            f"| {s['label']} | {metrics['accuracy']['value']:.2f} | {_fmt(cf.get('mean'), '.1f')} ± "
            f"{_fmt(cf.get('std'), '.1f')} | {_fmt(gn.get('mean'), '.2f')} | {_fmt(hn.get('mean'), '.1f')} | {pgd} "
            f"| {cost} ({s['train_seconds'] / 60:.1f} min) | {paper_text} |"
        )
    return "\n".join(lines) + "\n"


def _earlier_rows(results_dir: Path, zoo: Zoo) -> Dict[str, Dict[str, Any]]:
    """The row summaries of an earlier run into ``results_dir`` whose results are still there."""
    path = results_dir / "summary.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if earlier.get("zoo") != zoo.name:
        return {}
    return {s["row"]: s for s in earlier.get("rows", []) if (results_dir / s["results"]).is_file()}


def _output_dirs(args: argparse.Namespace, zoo: Zoo) -> Tuple[Path, Path]:
    """The results folder and the folder the Hub repositories are staged in: ``--results-dir`` and
    ``--hub-cards-dir``, else under output/ (the checked-in hub_cards/ with ``--publish``)."""
    hub_cards = Path(args.hub_cards_dir or (PUBLISHED_HUB_CARDS if args.publish else DEFAULT_OUTPUT / "hub_cards"))
    results = PUBLISHED_HUB_CARDS / "results" if args.publish else DEFAULT_OUTPUT
    return Path(args.results_dir or results / zoo.name), hub_cards


def reproduce(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Run the requested rows, then write table.md, summary.json and the figure; returns the row summaries."""
    from .evaluation.plots import curvature_robustness_figure
    from .train.checkpoint import atomic_write_text

    zoo = ZOOS[args.zoo]
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    known = {r.key: r for r in ROWS}
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise ValueError(f"unknown row(s) {unknown or [args.rows]}; valid rows: {', '.join(known)}")
    for key in keys:
        config = Path(args.configs_dir) / f"{zoo.name}_{key}.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"no config for row {key!r}: {config} does not exist")
    if args.push:  # fail now, not after hours of training
        from .hub import resolve_token

        resolve_token()
    results_dir = _output_dirs(args, zoo)[0]
    run = {key: _run_row(known[key], zoo, args, results_dir) for key in keys}
    # rows run earlier into the same folder stay in the table: running a subset (e.g. --rows relu,convert) adds to it
    merged = {**_earlier_rows(results_dir, zoo), **run}
    summaries = [merged[r.key] for r in ROWS if r.key in merged]
    atomic_write_text(results_dir / "summary.json", json.dumps({"zoo": zoo.name, "rows": summaries}, indent=2))
    atomic_write_text(results_dir / "table.md", comparison_table(zoo, summaries, results_dir))
    curvature_robustness_figure(
        [(s["label"], results_dir / s["results"]) for s in summaries], results_dir / "curvature_vs_robustness.png")
    print((results_dir / "table.md").read_text())
    print(f"wrote {results_dir}")
    return summaries


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    resume = f"resume with:\n  {shlex.join(['lcnn-timm', 'reproduce', *argv])}"
    try:
        reproduce(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"lcnn-timm reproduce: error: {e}", file=sys.stderr)
        return 2
    except ReproduceInterrupted as e:
        print(f"lcnn-timm reproduce: {e}; every finished step is kept; {resume}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:  # between steps, or before a step's own handler was installed
        print(f"lcnn-timm reproduce: interrupted; every finished step is kept; {resume}", file=sys.stderr)
        return 128 + signal.SIGINT
    return 0
