"""``lcnn-timm evaluate``: accuracy, curvature, PGD and gradient stability of one model -> results.json."""
import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from ..curvature.estimator import DEFAULT_LANCZOS_STEPS
from ..layers.spectral_norm import normalized_layer_norms
from ..train.paths import output_file_reason
from .datasets import EvalData, load_eval_data
from .metrics import DEFAULT_METRICS, METRICS, MetricOptions, run_metric
from .model import NormalizedModel, create_eval_model, file_sha256
from .plots import curvature_histogram
from .results import SCHEMA_VERSION, curvature_protocol, environment, new_results, write_per_example, write_results

__all__ = ["ZOO_COSTLY_COUNT", "main"]

# images the zoo's curvature, PGD and certified numbers are measured on (docs/zoo.md): the default of --costly-count
ZOO_COSTLY_COUNT = 1000
# exit status of a run stopped by Ctrl-C, as a shell reports a process killed by SIGINT
INTERRUPTED = 128 + signal.SIGINT


class EvaluationInterrupted(Exception):
    """Ctrl-C stopped the metrics; the message names the metric under way and those results.json holds."""


def _floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _model_kwargs(pairs: Sequence[str]) -> Dict[str, Any]:
    kwargs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-kwargs expects key=value, got {pair!r}")
        kwargs[key] = yaml.safe_load(value)  # 100 -> int, 0.1 -> float, true -> bool, text -> str
    return kwargs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcnn-timm evaluate",
        description="Measure a timm model on [0, 1] images (normalisation inside the model) and write results.json "
                    "plus a curvature histogram PNG beside it.",
    )
    p.add_argument("model", help="timm model name: lcnn_resnet18, hf-hub:org/repo, local-dir:/path, ...")
    p.add_argument("--checkpoint", help=".safetensors / .pth / .pt weights to load (must match the model exactly)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V", help="extra timm.create_model arguments")
    p.add_argument("--pretrained", action="store_true", default=None,
                   help="load the registry's pretrained weights (default for hf-hub:/local-dir: names)")
    p.add_argument("--convert", action="store_true",
                   help="the checkpoint is of a 'convert: true' training run: convert the model before loading it")
    p.add_argument("--dataset", required=True, metavar="NAME[:SPLIT]",
                   help="cifar10, cifar100, fashion_mnist, synthetic, or a timm dataset spec; split defaults to test")
    p.add_argument("--data-dir", help="local dataset folder (Parquet for CIFAR, IDX files for Fashion-MNIST)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--count", type=int, help="evaluate the first N examples")
    size.add_argument("--fraction", type=float, help="evaluate the first fraction F of the examples")
    costly = p.add_mutually_exclusive_group()
    costly.add_argument("--costly-count", type=int, default=ZOO_COSTLY_COUNT, metavar="N",
                        help="run curvature, PGD, certified, AutoAttack and gradient stability on only the first N of "
                             f"the selected examples (default {ZOO_COSTLY_COUNT}, the zoo's protocol; clean accuracy "
                             "still uses all of them)")
    costly.add_argument("--costly-all", dest="costly_count", action="store_const", const=None,
                        help="run the costly metrics on every selected example (on a CPU, curvature alone can take "
                             "over half an hour on a 10k-image test split)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from: {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    p.add_argument("--out", required=True, help="results.json path (the histogram PNG goes beside it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of Lanczos starts, PGD starts and noise")
    p.add_argument("--curvature-iterations", type=int, default=DEFAULT_LANCZOS_STEPS,
                   help="Lanczos steps (= Hessian-vector products) per example")
    p.add_argument("--curvature-eps", type=float, default=1e-6, help="eps in C = ||H|| / (||g|| + eps)")
    p.add_argument("--curvature-tol", type=float, default=0.0,
                   help="stop an example once its Ritz residual is <= tol * |eigenvalue| (0: never)")
    p.add_argument("--pgd-norm", choices=("l2", "linf"), default="l2", help="norm of PGD and AutoAttack")
    p.add_argument("--pgd-eps", type=_floats, default=(0.05, 0.1, 0.15, 0.2), help="radii of PGD and AutoAttack")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-relative-step", type=float, default=2.5, help="step size = this * eps / steps")
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--noise-levels", type=_floats, default=(1e-3, 1e-2, 1e-1), help="gradient-stability noise norms")
    p.add_argument("--noise-samples", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _parse_metrics(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or [text]}; valid metrics: {', '.join(METRICS)}")
    return [n for n in METRICS if n in names]  # run in dependency order


def _check_compatible(model: NormalizedModel, data: EvalData, device: torch.device) -> None:
    """One forward on the first batch, so shape/label mismatches fail here with a clear message."""
    x, y = next(iter(data.loader))
    with torch.no_grad():
        logits = model(x[:2].to(device))
    if int(y.max()) >= logits.shape[1]:
        raise ValueError(
            f"the dataset has label {int(y.max())} but the model has {logits.shape[1]} classes; "
            "pass --model-kwargs num_classes=N"
        )


def _model_info(args: argparse.Namespace, model: NormalizedModel, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    inner = model.model
    norms = normalized_layer_norms(inner)
    return {
        "name": args.model,
        "architecture": getattr(inner, "pretrained_cfg", {}).get("architecture"),
        "model_kwargs": kwargs,
        "converted": bool(args.convert),
        "pretrained": bool(args.pretrained) or args.model.startswith(("hf-hub:", "local-dir:")) and not args.checkpoint,
        "checkpoint": args.checkpoint,  # as given: an absolute path would leak the local file system
        "checkpoint_sha256": file_sha256(args.checkpoint) if args.checkpoint else None,
        "num_params": sum(p.numel() for p in inner.parameters()),
        "num_classes": getattr(inner, "num_classes", None),
        # largest operator norm of a spectrally normalised layer as evaluated (None: no such layer)
        "normalized_layer_norm_max": max(norms.values()) if norms else None,
        "input_normalization": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                                "applied": "inside the model; inputs are [0, 1] pixels"},
    }


def _rows(metrics: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    rows = []
    if "accuracy" in metrics:
        a = metrics["accuracy"]
        rows.append(("clean accuracy (%)", f"{a['value']:.2f}", f"{a['count']} images"))
    if "curvature" in metrics:
        c = metrics["curvature"]
        protocol = f"{c['count']} images, {curvature_protocol(c, SCHEMA_VERSION)}, eps {c['eps']:g}"
        if not c["meaningful"]:
            rows.append(("curvature", "n/a", "piecewise-linear activations: not meaningful"))
        for key, label in (("curvature", "E C_f"), ("gradient_norm", "E ||grad f||"), ("hessian_norm", "E ||H f||")):
            if key in c:
                rows.append((label, f"{c[key]['mean']:.4g} ± {c[key]['std']:.3g}", protocol))
    for r in metrics.get("pgd", []):
        rows.append((f"PGD {r['norm']} eps={r['eps']:g} (%)", f"{r['accuracy']:.2f}",
                     f"{r['count']} images, {r['steps']} steps of {r['step_size']:.4g}, {r['restarts']} restart(s)"))
    certified = metrics.get("certified", {})
    for level in certified.get("levels", []):
        rows.append((f"certified l2 eps={level['eps']:g} (%)", f"{level['combined']:.2f}",
                     f"{certified['count']} images; first-order {level['first_order']:.2f}, curvature {level['curvature']:.2f}"))
    for r in metrics.get("autoattack", []):
        rows.append((f"AutoAttack {r['norm']} eps={r['eps']:g} (%)", f"{r['accuracy']:.2f}", f"{r['count']} images"))
    for level in metrics.get("gradient_stability", {}).get("levels", []):
        predicted = f", predicted {level['predicted']:.3g}" if "predicted" in level else ""
        rows.append((f"grad change, noise {level['noise']:g}", f"{level['mean']:.4g}",
                     f"{metrics['gradient_stability']['count']} images{predicted}"))
    return rows


def _table(rows: List[Tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "protocol")]) for i in range(3)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("metric", "value", "protocol"), widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the requested metrics; write results.json (after each metric) and the histogram."""
    metric_names = _parse_metrics(args.metrics)
    problem = output_file_reason(Path(args.out))
    if problem:  # before any metric is computed
        raise ValueError(f"--out {args.out}: {problem}")
    kwargs = _model_kwargs(args.model_kwargs)
    device = torch.device(args.device)
    model = create_eval_model(args.model, args.checkpoint, kwargs, args.pretrained, args.convert).to(device)
    inner = model.model
    input_size = tuple(getattr(inner, "pretrained_cfg", {}).get("input_size", (3, 32, 32)))
    data = load_eval_data(
        args.dataset, args.data_dir, args.count, args.fraction, args.batch_size,
        input_size=(model.mean.shape[1], *input_size[1:]), num_classes=getattr(inner, "num_classes", 10),
        seed=args.seed,
    )
    _check_compatible(model, data, device)
    costly_data = data.head(args.costly_count)
    opts = MetricOptions(
        seed=args.seed, curvature_iterations=args.curvature_iterations, curvature_eps=args.curvature_eps,
        curvature_tol=args.curvature_tol, pgd_norm=args.pgd_norm, pgd_eps=args.pgd_eps, pgd_steps=args.pgd_steps,
        pgd_relative_step=args.pgd_relative_step, pgd_restarts=args.pgd_restarts, noise_levels=args.noise_levels,
        noise_samples=args.noise_samples, progress=not args.no_progress,
    )
    results = new_results(_model_info(args, model, kwargs), data.info, environment(device), args.seed)
    try:
        for name in metric_names:
            _run_and_write(name, args, model, data, costly_data, opts, results)
    except KeyboardInterrupt:
        kept = (f"{args.out} holds the finished metric(s): {', '.join(results['metrics'])}" if results["metrics"]
                else "no metric finished, nothing was written")
        raise EvaluationInterrupted(f"interrupted during {name}; {kept}") from None
    return results


def _run_and_write(name: str, args: argparse.Namespace, model: NormalizedModel, data: EvalData,
                   costly_data: EvalData, opts: MetricOptions, results: Dict[str, Any]) -> None:
    """Measure one metric into ``results`` and rewrite results.json, so an interrupted run keeps what it measured."""
    torch.manual_seed(args.seed)
    metric = run_metric(name, model, data if name == "accuracy" else costly_data, opts)
    if name == "curvature" and opts.per_example_curvature is not None:
        stem = os.path.splitext(args.out)[0]
        curvature_histogram(opts.per_example_curvature, stem + "_curvature_hist.png", f"{args.model} on "
                            f"{data.info['name']}:{data.info['split']}, {costly_data.count} images")
        write_per_example(stem + "_curvature.json", opts.per_example_curvature)
        metric["histogram"] = os.path.basename(stem + "_curvature_hist.png")
        metric["per_example"] = os.path.basename(stem + "_curvature.json")
    results["metrics"][name] = metric  # only a finished metric: an interruption above leaves results as they were
    write_results(args.out, results)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        results = evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"lcnn-timm evaluate: error: {e}", file=sys.stderr)
        return 2
    except EvaluationInterrupted as e:
        print(f"lcnn-timm evaluate: {e}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:  # while the model or the data loaded
        print("lcnn-timm evaluate: interrupted before any metric started; nothing was written", file=sys.stderr)
        return INTERRUPTED
    print(_table(_rows(results["metrics"])))
    print(f"wrote {args.out}")
    return 0
