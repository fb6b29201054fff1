"""Which autocast precision and memory layout to train in: measured on the model and device, not assumed.

``amp: auto`` and ``channels_last: auto`` time a few forward+backward steps of a copy of the actual model on
one real training batch, in every candidate cell, at start-up (as ``cudnn.benchmark`` does for kernels), and
keep the fastest. A reduced precision must beat float32 by :data:`REDUCED_PRECISION_MARGIN` to be chosen:
it costs accuracy (bf16 keeps 8 bits), so a tie goes to float32. bf16 is only a candidate where the device
computes it natively; emulated bf16 was 4-7x slower than fp32 on an AVX2-only AMD EPYC, so probing it there
would only cost time. Every cell a probe may choose is covered by ``tests/test_precision_matrix.py``.

channels_last is neither probed nor trained in where :func:`channels_last_hazard` finds a layer that oneDNN's AVX2
kernels crash on (issue 36, docs/training.md): a crash inside a probe cell would take the whole run down.
"""
import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BF16_CPU_FLAGS", "PrecisionChoice", "channels_last_hazard", "choose_precision", "crash_prone_convs",
           "has_native_bf16", "onednn_avx2_reason", "probe_step_seconds", "without_crashing_layout"]

# a reduced precision is chosen only if its step takes at most this fraction of float32's
REDUCED_PRECISION_MARGIN = 0.9

# /proc/cpuinfo flags of CPUs with bf16 arithmetic in hardware (AVX512-BF16, AMX); without them oneDNN
# emulates bf16 with fp32 conversions, measured 4-7x slower than plain fp32 on an AVX2-only AMD EPYC
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# oneDNN's AVX2 backward-weights kernel of a channels_last 1x1 convolution with stride > 1 (jit_avx2_1x1_convolution_
# bwd_weights, torch 2.14.1) corrupts the heap when the input has fewer channels than an AVX2 register holds floats:
# segfaults, glibc heap aborts and hangs, measured for 2-7 input channels and never for 8-24 (docs/training.md);
# 1 channel runs the same kernel and did not crash in 5 runs: too few to call it safe, so it is guarded too
CRASHING_INPUT_CHANNELS = 8
# oneDNN runs its avx512_core kernels only where the CPU has all four; otherwise AVX2 ones if it has avx2
AVX512_CORE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
# the variables that cap oneDNN's ISA (the first one set wins, as in oneDNN); the caps that select its AVX2 kernels,
# and those below them (whose kernels did not crash on the reproducer); any other cap leaves the choice to the CPU
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
AVX2_ISA_CAPS = frozenset({"AVX2", "AVX2_VNNI", "AVX2_VNNI_2"})
BELOW_AVX2_ISA_CAPS = frozenset({"SSE41", "AVX"})


def _cpu_flags(cpuinfo: Path) -> set:
    try:
        text = cpuinfo.read_text()
    except OSError:  # not Linux, or /proc unavailable: no evidence of any instruction set
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def has_native_bf16(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True if ``device`` computes bf16 in hardware.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the first ``flags`` line of
    ``cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` (Linux; elsewhere False).
    Other device types: False.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags(cpuinfo) & BF16_CPU_FLAGS)
    return False


def onednn_avx2_reason(cpuinfo: Path = Path("/proc/cpuinfo"), environ: Optional[Dict[str, str]] = None
                       ) -> Optional[str]:
    """Why oneDNN runs its AVX2 kernels on this CPU (a few words), or None where it does not.

    The CPU must list ``avx2`` in ``cpuinfo``'s flags; then a cap ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``
    (in ``environ``, default ``os.environ``) of AVX2, AVX2_VNNI or AVX2_VNNI_2 selects them, a lower cap (AVX,
    SSE41) does not, and otherwise (no cap, ALL or an AVX-512 one) a CPU without :data:`AVX512_CORE_FLAGS` does.
    """
    flags = _cpu_flags(cpuinfo)
    if "avx2" not in flags:  # no AVX2 kernels (or no flags to tell: not Linux, not x86)
        return None
    environ = os.environ if environ is None else environ
    variable = next((name for name in ONEDNN_ISA_VARIABLES if environ.get(name)), None)
    cap = environ[variable].upper() if variable else "ALL"
    if cap in AVX2_ISA_CAPS:
        return f"{variable}={environ[variable]}"
    if cap in BELOW_AVX2_ISA_CAPS or AVX512_CORE_FLAGS <= flags:
        return None
    return "AVX2 CPU without AVX-512"


def crash_prone_convs(model: nn.Module) -> List[str]:
    """Names of ``model``'s 2-D convolutions that oneDNN's AVX2 kernels crash on in channels_last backward:
    1x1 kernel, a stride above 1, fewer than :data:`CRASHING_INPUT_CHANNELS` input channels."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride != (1, 1)
            and module.in_channels < CRASHING_INPUT_CHANNELS]


def channels_last_hazard(model: nn.Module, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo"),
                         environ: Optional[Dict[str, str]] = None) -> Optional[str]:
    """One line saying why training ``model`` on ``device`` in channels_last would crash, or None where it would not.

    Known case only (issue 36): oneDNN's AVX2 kernels (:func:`onednn_avx2_reason`) on a model with a layer that
    :func:`crash_prone_convs` lists. Retire it when ``tests/test_channels_last_guard.py``'s reproducer is skipped.
    """
    if device.type != "cpu":
        return None
    isa = onednn_avx2_reason(cpuinfo, environ)
    convs = crash_prone_convs(model) if isa else []
    if not convs:
        return None
    return (f"channels_last skipped: oneDNN's AVX2 1x1 conv backward crashes on strided 1x1 convs with fewer than "
            f"{CRASHING_INPUT_CHANNELS} input channels ({isa}; {len(convs)} such layer(s), first {convs[0]!r}; "
            "issue 36)")


@dataclass
class PrecisionChoice:
    """The autocast dtype (None: float32) and memory layout a run trains in, and why.

    ``measured`` maps ``"<dtype>/<layout>"`` to the best seconds per forward+backward step of the probe
    (empty when nothing was left to choose).
    """

    precision: Optional[str]
    channels_last: bool
    reason: str
    measured: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """For metrics.jsonl, final_eval.json and the checkpoint (a resumed run keeps its choice)."""
        return {"precision": self.precision or "float32", "channels_last": self.channels_last,
                "reason": self.reason, "step_seconds": dict(self.measured)}

    @classmethod
    def from_dict(cls, values: dict) -> "PrecisionChoice":
        precision = None if values["precision"] == "float32" else values["precision"]
        return cls(precision, values["channels_last"], values["reason"], dict(values["step_seconds"]))


def _cell_name(precision: Optional[str], channels_last: bool) -> str:
    return f"{precision or 'float32'}/{'channels_last' if channels_last else 'contiguous'}"


def _precision_candidates(amp: Optional[bool], amp_dtype: str, device: torch.device) -> Tuple[List[Optional[str]], str]:
    if amp is False:
        return [None], "amp: false"
    if amp:
        return [amp_dtype], f"amp: true ({amp_dtype})"
    if has_native_bf16(device):
        return [None, "bfloat16"], "amp: auto"
    native = "a GPU with bf16" if device.type == "cuda" else f"CPU flags {' or '.join(sorted(BF16_CPU_FLAGS))}"
    return [None], f"amp: auto, float32 only ({device.type} lacks native bf16: needs {native})"


def _step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: Optional[str]) -> None:
    with torch.autocast(images.device.type, dtype=getattr(torch, precision or "float32"), enabled=precision is not None):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()


def _layout_candidates(channels_last: Optional[bool], model: nn.Module, images: torch.Tensor
                       ) -> Tuple[List[bool], str]:
    """The layouts to probe (False: contiguous) and how they were decided, for the choice's reason."""
    layouts = [False, True] if channels_last is None and images.dim() == 4 else [bool(channels_last)]
    note = "channels_last: auto" if len(layouts) > 1 else f"channels_last: {str(layouts[0]).lower()}"
    hazard = channels_last_hazard(model, images.device) if layouts[-1] else None
    return ([False], f"{note}, {hazard}") if hazard else (layouts, note)


def without_crashing_layout(choice: PrecisionChoice, model: nn.Module, device: torch.device) -> PrecisionChoice:
    """``choice`` (a resumed run's, made elsewhere), contiguous instead where channels_last would crash here."""
    hazard = channels_last_hazard(model, device) if choice.channels_last else None
    return dataclasses.replace(choice, channels_last=False, reason=f"{choice.reason}; {hazard}") if hazard else choice


def probe_step_seconds(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                       cells: List[Tuple[Optional[str], bool]], repeats: int = 3) -> Dict[str, float]:
    """Best wall seconds of one forward+backward step (cross-entropy) of ``model`` on ``images`` in each cell.

    Runs on deep copies, one per layout, in training mode, under a forked RNG: the model, its statistics
    and the random streams are left as they were. Cells are timed in turn (``repeats`` rounds after one
    warm-up step each), so a slow phase of the machine falls on every cell alike.
    """
    sync = torch.cuda.synchronize if images.device.type == "cuda" else (lambda: None)
    copies = {}
    for _, channels_last in cells:
        if channels_last not in copies:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            copies[channels_last] = (copy.deepcopy(model).train().to(memory_format=layout),
                                     images.contiguous(memory_format=layout))
    best = {_cell_name(*cell): float("inf") for cell in cells}
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for round_ in range(repeats + 1):
            for precision, channels_last in cells:
                probe, batch = copies[channels_last]
                sync()
                start = time.perf_counter()
                _step(probe, batch, labels, precision)
                sync()
                probe.zero_grad(set_to_none=True)
                if round_:  # round 0 warms up (oneDNN/cuDNN kernel selection)
                    name = _cell_name(precision, channels_last)
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose_precision(amp: Optional[bool], amp_dtype: str, channels_last: Optional[bool], model: nn.Module,
                     images: torch.Tensor, labels: torch.Tensor) -> PrecisionChoice:
    """The precision and layout to train ``model`` in on ``images``' device.

    ``amp``/``channels_last`` None mean auto: every remaining candidate cell is timed by
    :func:`probe_step_seconds` and the fastest kept, a reduced precision only if it takes at most
    :data:`REDUCED_PRECISION_MARGIN` of float32's best time. Explicit values are kept as given, except
    channels_last where :func:`channels_last_hazard` finds it would crash.
    """
    precisions, precision_note = _precision_candidates(amp, amp_dtype, images.device)
    layouts, layout_note = _layout_candidates(channels_last, model, images)
    cells = [(p, c) for p in precisions for c in layouts]
    if len(cells) == 1:
        return PrecisionChoice(*cells[0], f"{precision_note}; {layout_note} -> {_cell_name(*cells[0])}")
    measured = probe_step_seconds(model, images, labels, cells)
    chosen = min((measured[_cell_name(p, c)], p, c) for p, c in cells)
    fp32 = min(((measured[_cell_name(p, c)], p, c) for p, c in cells if p is None), default=None)
    if fp32 is not None and chosen[1] is not None and chosen[0] > REDUCED_PRECISION_MARGIN * fp32[0]:
        chosen = fp32
    timings = ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in measured.items())
    reason = (f"{precision_note}; {layout_note} -> {_cell_name(chosen[1], chosen[2])} (probe, one training step "
              f"of batch {len(images)}: {timings}; reduced precision needs <= {REDUCED_PRECISION_MARGIN:.0%} "
              "of float32's time)")
    return PrecisionChoice(chosen[1], chosen[2], reason, measured)
