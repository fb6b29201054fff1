"""Training-step cost of lcnn_resnet18 against a ReLU ResNet-18 and the reference code, side by side in one run.

One step = forward, cross-entropy, backward, SGD (momentum 0.9) update, on a
fixed random batch (default 128 x 3 x 32 x 32, 100 classes). The variants are
timed round-robin, best of ``--reps`` (after one warm-up step each), so that load
from other processes on a shared machine hits them alike.

* relu:       timm ``resnet18`` with a CIFAR stem (3x3 stride-1 conv, no max-pool): ReLU, affine BN, x + F(x) blocks
* standard:   ``cifar_resnet18``, the paper's baseline (halves blocks, softplus beta=1000, plain BN, SN head)
* lcnn:       ``lcnn_resnet18``
* reference:  ``resnet18lcnn`` of the reference code (kylematoba/lcnn), imported from ``--reference PATH``
              (a checkout's root; the column is skipped with a message when absent)

``--breakdown`` adds ablations of lcnn_resnet18 that attribute its extra cost to
its parts (the differences between rows):

* lcnn_no_power_iter: the per-step power iteration of the spectral norms switched off (sigma still computed)
* lcnn_no_conv_sn:    plain convs (head still spectrally normalised)
* lcnn_bn:            plain affine-free BatchNorm instead of gamma-BN
* lcnn_relu_act:      ReLU instead of centered softplus
* halves_relu:        halves blocks with ReLU, plain BN, plain convs (the block structure's own cost against relu)

``--compile`` adds each timed variant once more under ``torch.compile`` (inductor; the trainer's
``torchcompile: inductor``), as ``<name>+compile`` rows, and prints each variant's first (warm-up) step, which
for those rows includes the compilation.

``--channels-last`` puts every model and the batch in channels_last memory format, as the shipped
configs' ``channels_last: true`` does in training (the reference code itself trains contiguous tensors).

``--cells`` times every variant in each precision x memory-layout cell a user can train in ({fp32, bf16, fp16}
autocast x {contiguous, channels_last}), all interleaved in one run, and prints one table: each cell's step
time and its ratio to the ReLU step of the same cell (emulated bf16/fp16 cells are timed too, and marked).

``--profile`` prints, for every timed variant, how much of one profiled step the convolutions take
(forward and backward; the same oneDNN kernels in every variant, so a floor none of them can go below),
then torch.profiler's table of the lcnn step's most expensive ops.

    python benchmarks/bench_step.py --reference /tmp/lcnn_ref [--reps 5] [--batch-size 128] [--threads 1]
        [--dtype fp32|bf16] [--channels-last] [--cells] [--breakdown] [--compile] [--profile] [--device cpu|cuda]
        [--only NAME ...]

Run it from the repository root with ``PYTHONPATH=.`` to time a checkout rather than the installed package.
"""
import argparse
import copy
import os
import platform
import sys
import time
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from torch import nn

import lcnn_timm  # noqa: F401  (registers the models)
from lcnn_timm.layers import OperatorSpectralNorm

NUM_CLASSES = 100


def relu_resnet18(num_classes: int = NUM_CLASSES) -> nn.Module:
    """timm's ResNet-18 with the CIFAR stem: 3x3 stride-1 first conv and no max-pool."""
    model = timm.create_model("resnet18", num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def reference_resnet18lcnn(path: str, num_classes: int = NUM_CLASSES) -> nn.Module:
    """``resnet18lcnn`` built by the reference code's own model selector (imported from ``path``)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    from models.model_selector import model_architecture  # the reference checkout's top-level package

    return model_architecture["resnet18lcnn"](num_classes=num_classes)


def without_power_iteration(model: nn.Module) -> nn.Module:
    """Stop the spectral norms' per-step power iteration (eval-mode parametrizations still divide by sigma)."""
    model.train = partial(_train_keeping_norms_frozen, model)
    model.train()
    return model


def _train_keeping_norms_frozen(model: nn.Module, mode: bool = True) -> nn.Module:
    nn.Module.train(model, mode)
    for module in model.modules():
        if isinstance(module, OperatorSpectralNorm):
            module.training = False
    return model


def build_variants(reference: Optional[str], breakdown: bool, img_size: int = 32) -> Dict[str, Callable[[], nn.Module]]:
    """Model builders by variant name; the spectrally normalised convs are sized for ``img_size``."""
    plain = dict(norm_layer=partial(nn.BatchNorm2d, affine=False))
    lcnn = partial(timm.create_model, "lcnn_resnet18", num_classes=NUM_CLASSES, img_size=img_size)
    cifar = partial(timm.create_model, "cifar_resnet18", num_classes=NUM_CLASSES, img_size=img_size)
    variants = {
        "relu": relu_resnet18,
        "standard": cifar,
        "lcnn": lcnn,
    }
    if reference is not None:
        variants["reference"] = partial(reference_resnet18lcnn, reference)
    if breakdown:
        variants.update({
            "lcnn_no_power_iter": lambda: without_power_iteration(lcnn()),
            "lcnn_no_conv_sn": lambda: lcnn(conv_spectral_norm=False),
            "lcnn_bn": lambda: lcnn(**plain),
            "lcnn_relu_act": lambda: lcnn(act_layer="relu"),
            "halves_relu": lambda: cifar(act_layer="relu", head_spectral_norm=False),
        })
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               amp_dtype: Optional[torch.dtype]) -> None:
    with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_seconds(models: Dict[str, nn.Module], images: Union[torch.Tensor, Dict[str, torch.Tensor]],
                 labels: torch.Tensor, reps: int,
                 amp_dtype: Union[None, torch.dtype, Dict[str, Optional[torch.dtype]]] = None,
                 ) -> Dict[str, Tuple[float, float, float]]:
    """(wall, CPU, warm-up wall) seconds of the fastest of ``reps`` training steps per model, interleaved round-robin.

    ``images`` and ``amp_dtype`` are shared, or given per model name (a batch per memory layout, a dtype per cell).

    One warm-up step each first (for a compiled model it includes the compilation). The CPU time is this thread's (``time.thread_time``): with one
    intra-op thread it is the step's own work, which other processes on a shared machine do not
    inflate the way they inflate wall time. On CUDA it is not meaningful and equals the wall time.
    """
    device = labels.device
    cpu_clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in models.items()}
    times = {name: [] for name in models}
    warm_up = {}
    for rep in range(reps + 1):
        for name, model in models.items():
            _sync(device)
            wall, cpu = time.perf_counter(), cpu_clock()
            batch = images[name] if isinstance(images, dict) else images
            train_step(model, optimizers[name], batch, labels, amp_dtype[name] if isinstance(amp_dtype, dict) else amp_dtype)
            _sync(batch.device)
            if rep:
                times[name].append((time.perf_counter() - wall, cpu_clock() - cpu))
            else:
                warm_up[name] = time.perf_counter() - wall
    return {name: (min(t[0] for t in values), min(t[1] for t in values), warm_up[name])
            for name, values in times.items()}


CELL_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CELL_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def native_reduced_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``dtype`` (bf16/fp16) runs natively: oneDNN's ISA checks on CPU, CUDA always (fp16) or per device."""
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    check = torch.ops.mkldnn._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else \
        torch.ops.mkldnn._is_mkldnn_fp16_supported
    return bool(check())


def time_cells(variants: Dict[str, Callable[[], nn.Module]], device: torch.device, batch_size: int, img_size: int,
               reps: int, precisions: Sequence[str] = tuple(CELL_DTYPES)) -> None:
    """Print every variant's step in every precision x layout cell, timed in one interleaved run."""
    torch.manual_seed(0)
    base = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    models, images, dtypes = {}, {}, {}
    for variant, build in variants.items():
        model = build().to(device)
        for layout, memory_format in CELL_LAYOUTS.items():
            for precision in precisions:
                dtype = CELL_DTYPES[precision]
                key = f"{variant} {precision}/{layout}"
                models[key] = copy.deepcopy(model).to(memory_format=memory_format).train()
                images[key], dtypes[key] = base.contiguous(memory_format=memory_format), dtype
    seconds = step_seconds(models, images, labels, reps, dtypes)
    clock = 1 if device.type == "cpu" and torch.get_num_threads() == 1 else 0  # thread CPU time, else wall
    cells = [f"{p}/{layout}" for layout in CELL_LAYOUTS for p in precisions]
    emulated = {p for p in precisions if CELL_DTYPES[p] is not None and not native_reduced_precision(CELL_DTYPES[p], device)}
    print(f"step ms ({'thread CPU' if clock else 'wall'} time) and ratio to relu in the same cell"
          + (f"; emulated here: {', '.join(sorted(emulated))}" if emulated else ""))
    print(f"{'':>10}" + "".join(f"{cell:>26}" for cell in cells))
    for variant in variants:
        row = []
        for cell in cells:
            t = seconds[f"{variant} {cell}"][clock]
            relu = seconds[f"relu {cell}"][clock]
            row.append(f"{t * 1e3:9.1f} ms {t / relu:5.2f}x relu")
        print(f"{variant:>10}" + "".join(f"{entry:>26}" for entry in row))
    first = cells[0]
    print(f"relu in each cell / relu {first}: " + ", ".join(
        f"{cell} {seconds[f'relu {cell}'][clock] / seconds[f'relu {first}'][clock]:.2f}x" for cell in cells))


def bf16_supported(device: torch.device) -> bool:
    """Whether the hardware runs bf16 natively (on CPU: oneDNN's AVX512-BF16/AMX check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), since ``platform.processor()`` is empty or just the ISA on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run_conditions(device: torch.device) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} thread(s), " \
                f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    return f"torch {torch.__version__}, timm {timm.__version__}, {where}"


def profile_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 amp_dtype: Optional[torch.dtype]) -> torch.profiler.profile:
    """torch.profiler's record of one training step (after one unprofiled step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    train_step(model, optimizer, images, labels, amp_dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if images.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        train_step(model, optimizer, images, labels, amp_dtype)
    return prof


def convolution_share(prof: torch.profiler.profile) -> Tuple[float, float]:
    """(convolution, total) self CPU seconds of a profiled step; convolution = every aten op named *conv*."""
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    conv = sum(event.self_cpu_time_total for event in events if "conv" in event.key)
    return conv / 1e6, total / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=None, help="root of a kylematoba/lcnn checkout (its column is skipped if absent)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--breakdown", action="store_true", help="also time ablations of lcnn_resnet18")
    parser.add_argument("--compile", action="store_true", help="also time every variant under torch.compile (inductor)")
    parser.add_argument("--channels-last", action="store_true", help="models and batch in channels_last memory format")
    parser.add_argument("--cells", action="store_true",
                        help="time every variant in each {fp32, bf16, fp16} x {contiguous, channels_last} cell")
    parser.add_argument("--precisions", nargs="+", choices=tuple(CELL_DTYPES), default=tuple(CELL_DTYPES),
                        help="the precisions --cells times (fp16 autocast training on a CPU can take minutes a step)")
    parser.add_argument("--profile", action="store_true",
                        help="print each variant's convolution time and the profiler's op table of one lcnn step")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="time only these variants (relu is always timed)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here; run with --device cpu")
    torch.set_num_threads(args.threads)
    amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
    if amp_dtype is not None and not bf16_supported(device):
        print(f"note: this {device.type} has no native bf16; bf16 autocast is emulated and slow (timed anyway)")
    reference = args.reference
    if reference is not None and not os.path.isfile(os.path.join(reference, "models", "model_selector.py")):
        print(f"no reference checkout at {reference!r} (expected models/model_selector.py): reference column skipped")
        reference = None
    elif reference is None:
        print("no --reference PATH given: reference column skipped")

    torch.manual_seed(0)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    variants = build_variants(reference, args.breakdown or bool(args.only), args.img_size)
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            sys.exit(f"--only: unknown variant(s) {sorted(unknown)}; choose from {sorted(variants)}")
        variants = {name: build for name, build in variants.items() if name == "relu" or name in args.only}
    if args.cells:
        print(f"{run_conditions(device)}; batch {args.batch_size}, {args.img_size}x{args.img_size}, {NUM_CLASSES} "
              f"classes, best of {args.reps} interleaved steps")
        time_cells(variants, device, args.batch_size, args.img_size, args.reps, args.precisions)
        return
    models = {name: build().to(device, memory_format=memory_format).train() for name, build in variants.items()}
    if args.compile:
        for name, build in variants.items():
            models[f"{name}+compile"] = build().to(device, memory_format=memory_format).train()
            models[f"{name}+compile"].compile()
    layout = ", channels_last" if args.channels_last else ""
    print(f"{run_conditions(device)}; batch {args.batch_size}, {args.img_size}x{args.img_size}, {NUM_CLASSES} classes, "
          f"{args.dtype}{layout}, best of {args.reps} interleaved steps")
    seconds = step_seconds(models, images, labels, args.reps, amp_dtype)
    clock = "thread CPU" if device.type == "cpu" and args.threads == 1 else "wall"
    print(f"{'':>20}  {'wall ms':>9} {'CPU ms':>9} {'warm-up s':>9}   ratios of {clock} time")
    for name, (wall, cpu, warm_up) in seconds.items():
        ratios = f"{cpu / seconds['relu'][1]:.2f}x relu"
        if "reference" in seconds:
            ratios += f", {cpu / seconds['reference'][1]:.2f}x reference"
        for baseline in ("relu+compile", "reference+compile"):
            if name.endswith("+compile") and baseline in seconds and name != baseline:
                ratios += f", {cpu / seconds[baseline][1]:.2f}x {baseline}"
        print(f"{name:>20}: {wall * 1e3:9.1f} {cpu * 1e3:9.1f} {warm_up:9.1f}   {ratios}")
    if args.profile:
        print("one profiled step each (self CPU time):")
        records = {name: profile_step(model, images, labels, amp_dtype)
                   for name, model in models.items() if not name.endswith("+compile")}
        for name, prof in records.items():
            conv, total = convolution_share(prof)
            print(f"{name:>20}: {total * 1e3:9.1f} ms, convolutions {conv * 1e3:9.1f} ms ({conv / total:.0%}), "
                  f"the rest {(total - conv) * 1e3:9.1f} ms")
        if "lcnn" in records:
            sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(records["lcnn"].key_averages().table(sort_by=sort, row_limit=25))


if __name__ == "__main__":
    main()
