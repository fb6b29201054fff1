"""Converting a trained ReLU model into an LCNN, measured side by side (issue 24; the table in docs/converter.md).

Needs the source run: ``lcnn-timm train --config configs/fashion_mnist_relu.yaml`` (pass its weights as
``--source``). On the Fashion-MNIST test split, for

* the source ReLU model;
* the conversion (``convert_model(..., function_preserving=True)``, as ``configs/fashion_mnist_convert.yaml``
  builds it) right away;
* the conversion after BN re-estimation only (a ``lcnn-timm train`` run at lr 0: 1 step that changes nothing,
  then the config's precise BN);
* the conversion fine-tuned with the LCNN recipe on a fraction of an epoch (``train_num_samples``: one pass over
  that many training images, the config's cosine schedule compressed into it);
* the zoo's from-scratch LCNN (``lcnn_resnet18_025.fmnist``, shipped weights);

it prints the accuracy on the whole test split, the median and p90 of ``C_f`` on the first ``--curvature-count``
test images, and the LCNN training steps each needed (the from-scratch LCNN: 3 epochs of 469 steps), and writes
``summary.json`` under ``--out``. Step counts, not seconds, compare across machines; the seconds measured here are
printed beside them with the CPU's name.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.convert import convert_model
from lcnn_timm.evaluation.datasets import load_eval_data
from lcnn_timm.evaluation.metrics import MetricOptions, accuracy, curvature
from lcnn_timm.evaluation.model import NormalizedModel, create_eval_model
from lcnn_timm.train.cli import main as train_main
from lcnn_timm.train.config import load_config
from lcnn_timm.zoo import training_seconds

from bench_step import cpu_name  # the benchmark next to this script

ZOO_STEPS = 3 * 469  # the zoo LCNN: 3 epochs of 60000 images in batches of 128


def measure(model: torch.nn.Module, data_dir: Optional[str], curvature_count: int) -> Dict[str, Any]:
    """Test accuracy (all 10k) and C_f median / p90 (first ``curvature_count``) of a [0, 1]-input model."""
    model = NormalizedModel(model, [0.0], [1.0]).eval()
    opts = MetricOptions(progress=False)
    everything = load_eval_data("fashion_mnist:test", data_dir, input_size=(1, 28, 28), batch_size=256)
    first = load_eval_data("fashion_mnist:test", data_dir, count=curvature_count, input_size=(1, 28, 28))
    result = {"accuracy": accuracy(model, everything, opts)["value"]}
    block = curvature(model, first, opts)
    if block["meaningful"]:
        values = opts.per_example_curvature.double()
        result.update(curvature_median=values.median().item(), curvature_p90=values.quantile(0.9).item())
    return result


def _fine_tune(config: str, source: str, out: Path, name: str, overrides: List[str]) -> Path:
    run = out / name
    if not (run / "final_eval.json").is_file():
        argv = ["--config", config, "--initial-checkpoint", source, "--output", str(out), "--experiment", name,
                "--progress", "false", *overrides]
        if train_main(argv) != 0:
            raise SystemExit(f"training {name} failed")
    return run


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="the ReLU source's model.safetensors")
    p.add_argument("--config", default="configs/fashion_mnist_convert.yaml")
    p.add_argument("--out", default="output/convert_trained")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1", help="fine-tuning budgets, in epochs of 60000 images")
    p.add_argument("--curvature-count", type=int, default=500)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    out = Path(args.out)
    build = dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans, **cfg.model_kwargs)
    rows = []

    def row(label: str, model: torch.nn.Module, steps: int, seconds: Optional[float] = None) -> None:
        rows.append({"model": label, "lcnn_steps": steps, "train_seconds": seconds,
                     **measure(model, args.data_dir, args.curvature_count)})
        print(json.dumps(rows[-1]), flush=True)

    source = timm.create_model(cfg.model, checkpoint_path=args.source, **build)
    row("source (ReLU)", source, 0)
    converted, report = convert_model(source, input_size=(cfg.in_chans, 28, 28), beta=cfg.convert_beta,
                                      function_preserving=cfg.convert_function_preserving)
    print(report.summary(), flush=True)
    row("converted", converted, 0)
    runs = [("bn_only", ["--lr", "0", "--train-num-samples", "128"], 0)]
    runs += [(f"finetune_{f}", ["--train-num-samples", str(int(60000 * float(f)))], int(60000 * float(f)) // 128)
             for f in args.fractions.split(",")]
    for name, overrides, steps in runs:
        run = _fine_tune(args.config, args.source, out, name, overrides)
        model = create_eval_model(cfg.model, str(run / "model.safetensors"), build, convert=True).model
        row(name, model, steps, training_seconds(run))
    row("zoo LCNN (from scratch)", timm.create_model("lcnn_resnet18_025.fmnist", pretrained=True), ZOO_STEPS)
    summary = {"cpu": cpu_name(), "torch": torch.__version__, "python": sys.version.split()[0], "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{summary['cpu']}\n| model | LCNN steps | train s | acc (%) | C_f median | C_f p90 |\n|---|---|---|---|---|---|")
    for r in rows:
        cf = (f"{r['curvature_median']:.1f} | {r['curvature_p90']:.1f}" if "curvature_median" in r
              else "not meaningful (piecewise linear) | –")
        seconds = "–" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"| {r['model']} | {r['lcnn_steps']} | {seconds} | {r['accuracy']:.2f} | {cf} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
