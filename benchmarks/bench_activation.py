"""Training-step speed of a CIFAR ResNet-18 with CenteredSoftplus vs ReLU vs nn.Softplus.

bf16 autocast, channels_last, batch 128, 32x32, measured side by side in one run.
Target (issue 2): CenteredSoftplus step >= 0.8x the speed of the ReLU step.

    python benchmarks/bench_activation.py [--steps 5] [--batch-size 128]
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F
from torch import nn

from lcnn_timm.layers import CenteredSoftplus


class SoftplusAct(nn.Softplus):
    """nn.Softplus accepting timm's ``inplace`` argument."""

    def __init__(self, inplace: bool = False):
        super().__init__()


def cifar_resnet18(act_layer) -> nn.Module:
    model = timm.create_model("resnet18", num_classes=100, act_layer=act_layer)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.to(memory_format=torch.channels_last)


def step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(steps + 1):  # first step warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch_size,))
    results = {}
    for name, act in [("ReLU", nn.ReLU), ("CenteredSoftplus", CenteredSoftplus), ("nn.Softplus", SoftplusAct)]:
        results[name] = step_seconds(cifar_resnet18(act), x, y, args.steps)
        print(f"{name:>18}: {results[name]:.3f} s/step", flush=True)
    for name in ("CenteredSoftplus", "nn.Softplus"):
        print(f"speed {name} / ReLU: {results['ReLU'] / results[name]:.2f}x (target for CenteredSoftplus: >= 0.8x)")


if __name__ == "__main__":
    main()
