"""The training loop of ``lcnn-timm train``, assembled from timm's parts.

``create_model`` -> :class:`LCNNTask` -> ``create_optimizer_v2`` (beta/gamma
without weight decay) -> ``create_scheduler_v2`` -> optional ``ModelEmaV3`` and
``torch.compile`` -> DDP. Data comes from :mod:`lcnn_timm.data` as
:class:`TensorLoader` batches. Every epoch appends to ``metrics.jsonl``,
redraws the PNG curves and writes an atomic checkpoint; ``resume`` replays the
run exactly from the last checkpoint. SIGINT/SIGTERM finish the current step,
checkpoint it and raise :class:`TrainingInterrupted`.
"""
import contextlib
import copy
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from timm.models import create_model
from timm.models import load_checkpoint as load_timm_weights
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import distribute_bn
from timm.utils.model import unwrap_model
from torch import nn
from tqdm import tqdm

from ..certify.gamma_cap import cap_gamma
from ..curvature.penalty import lcnn_parameters
from ..data import TensorLoader, load_image_tensors, resolve_dataset_name
from ..layers.spectral_norm import normalized_layer_norms, refresh_spectral_norms
from .checkpoint import (CheckpointError, atomic_write_text, checkpoint_path, describe_mismatch, load_checkpoint,
                         save_checkpoint, save_weights)
from .paths import checkpoint_candidates, output_dir, preflight, resume_folder, resume_problem
from .certified_loss import LipschitzMarginLoss
from .config import TrainConfig
from .layout import Layout, global_batch, split_batch, world_change_problem
from .metrics import MeanMeter, plot_metrics, read_metrics, write_metrics
from .precision import PrecisionChoice, choose_precision, without_crashing_layout
from .regularizers import frozen_state
from .run_lock import RunLock
from .task import AdversarialConfig, LCNNTask

__all__ = ["CheckpointWriteError", "NonFiniteLossError", "TrainSetupError", "Trainer", "TrainingInterrupted", "param_groups", "train"]

LCNN_NO_DECAY = ("log_beta", "log_gamma")
# recovery_interval unset: a mid-epoch checkpoint after this much training time, so a crash or kill -9 loses
# at most ~10 minutes (SIGINT/SIGTERM lose nothing: they checkpoint the current step)
RECOVERY_SECONDS = 600.0


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class TrainSetupError(ValueError):
    """The run cannot start (data, model or checkpoint to resume); nothing has been written. ``local``: a problem
    of this rank alone (its data folder), which it reports itself; the others are reported by rank 0."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a file system gone read-only); the previous one is intact."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training; ``checkpoint`` (if any) resumes it exactly."""

    def __init__(self, signal_name: str, where: str, checkpoint: Optional[Path]):
        self.signal_name, self.checkpoint = signal_name, checkpoint
        saved = f"checkpoint: {checkpoint}" if checkpoint else "no checkpoint had been written yet"
        super().__init__(f"interrupted by {signal_name} {where}; {saved}")


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two groups: weight decay on everything but beta/gamma (``log_beta``/``log_gamma``) and ``no_weight_decay()`` names.

    Like the reference (and unlike timm's default) biases and norm weights keep weight decay.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = name in skip or name.rsplit(".", 1)[-1] in LCNN_NO_DECAY
        (no_decay if excluded else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _distributed_setup(cfg: TrainConfig) -> Tuple[torch.device, int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device.startswith("cuda") if cfg.device else torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else (cfg.device or "cpu"))
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return device, rank, world_size


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Trainer:
    """One training run described by a :class:`TrainConfig` (see :func:`train`).

    Rank 0 holds the run folder's lock from here to the end of :meth:`fit`: ``lock``, taken by ``lcnn-timm train``
    before it imported torch, or taken here (:func:`~lcnn_timm.train.paths.preflight`). The trainer releases it,
    and on a failed set-up removes the folder if the lock created it and nothing else was written.
    """

    def __init__(self, cfg: TrainConfig, lock: Optional[RunLock] = None):
        self.cfg = cfg
        self.device, self.rank, self.world_size = _distributed_setup(cfg)
        self.primary = self.rank == 0
        self.out_dir = output_dir(cfg)
        problem, self.lock = (None, lock) if lock is not None else preflight(cfg, self.primary)
        if self._any_rank(problem is not None):  # rank 0 alone locks and writes: if a rank cannot start, none does
            if problem is None:
                raise TrainSetupError("another rank could not start the run (it says why)")
            raise TrainSetupError(problem if self.primary else f"rank {self.rank}: {problem}", local=not self.primary)
        try:
            self._set_up()
        except BaseException:
            self.release(discard=True)
            raise

    def release(self, discard: bool = False) -> None:
        """Free the run folder (``discard``: and remove it if the lock created it and it holds nothing else)."""
        if self.lock is not None:
            self.lock.release(discard=discard)

    def _set_up(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.channels_last = False  # until _set_precision
        found = self._find_checkpoint(cfg.resume) if cfg.resume else None  # before the data: errors come at once
        self.layout = self._layout(found[2] if found else None)
        self._build_data()
        self._build_model(found[2].get("precision_choice") if found else None)
        self.meter = MeanMeter()
        self.epoch, self.batch, self.step = 0, 0, 0
        self.epoch_seconds = 0.0  # time in training steps so far this epoch
        self.rows: List[dict] = []
        self.last_checkpoint: Optional[Path] = None
        self.last_save_time = time.monotonic()
        self.stop_signal: Optional[str] = None  # set by the SIGINT/SIGTERM handler
        self.save_after_step = self.stop_after_step = False
        self.running_step: Optional[int] = None  # the step under way, for the SIGINT/SIGTERM handler's message
        self._calibrated: Optional[Tuple[int, nn.Module]] = None  # (step, BN-recalibrated copy of the model)
        if found is not None:
            self._load_checkpoint(*found)
        if self.primary:
            print(f"precision: {self.choice.reason}", flush=True)

    # ---------------------------------------------------------------- setup
    def _layout(self, state: Optional[dict]) -> Layout:
        """This launch's layout: the global batch (the checkpoint's when resuming) split over its processes.

        A resumed run at another world size is refused unless ``allow_world_size_change``, which is then printed;
        :meth:`_record_layout` keeps every change (thread counts too) in ``layout_history``."""
        saved = None
        if state is not None:  # checkpoints from before issue 31 record no layout: single-process runs
            saved = state.get("layout") or {"world_size": 1, "global_batch": state["config"]["batch_size"]}
            problem = world_change_problem(saved, self.world_size, self.cfg.allow_world_size_change)
            if problem:
                raise TrainSetupError(problem)
        batch = saved["global_batch"] if saved else global_batch(self.cfg, self.world_size)
        try:
            per_process = split_batch(batch, self.world_size)
        except ValueError as error:
            raise TrainSetupError(str(error)) from None
        nnodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))  # torchrun's count of node agents
        layout = Layout(self.world_size, nnodes, batch, per_process, torch.get_num_threads())
        self.layout_history = list(state.get("layout_history", [])) if state else []
        if self.primary:
            print(layout.describe(), flush=True)
        if saved and self.world_size != saved["world_size"] and self.primary:
            print(f"resume: world size {saved['world_size']} -> {self.world_size} (allow_world_size_change); "
                  f"global batch {batch} kept", flush=True)
        return layout

    def _record_layout(self) -> None:
        """Add the layout to ``layout_history`` when it differs from the last entry's (a start or a changed resume)."""
        entry = {"step": self.step, **self.layout.as_dict()}
        if not self.layout_history or {**self.layout_history[-1], "step": self.step} != entry:
            self.layout_history.append(entry)

    def _build_data(self) -> None:
        cfg = self.cfg
        if resolve_dataset_name(cfg.dataset) is None:
            raise TrainSetupError(
                f"dataset {cfg.dataset!r}: lcnn-timm train reads cifar10, cifar100 and fashion_mnist "
                "(also as hfds/uoft-cs/cifar10, hfds/uoft-cs/cifar100, torch/fashion_mnist); use timm's train.py "
                "with device_modules: [lcnn_timm] for other datasets"
            )
        try:
            train_x, train_y = load_image_tensors(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.target_key)
            val_x, val_y = load_image_tensors(cfg.dataset, cfg.val_split, cfg.data_dir, cfg.target_key)
        except (OSError, ValueError) as error:  # a missing or damaged data_dir: one line naming it
            raise TrainSetupError(f"dataset {cfg.dataset!r} (data_dir {cfg.data_dir or 'default'}): {error}") from None
        if cfg.img_size is not None and cfg.img_size != train_x.shape[-1]:
            raise TrainSetupError(f"img_size {cfg.img_size} differs from the dataset's native size {train_x.shape[-1]}; "
                             "the tensor pipeline does not resize")
        self.num_classes = cfg.num_classes or int(max(train_y.max(), val_y.max())) + 1
        self.in_chans = cfg.in_chans or train_x.shape[1]
        if cfg.train_num_samples:  # a fixed random subset, the same for every seed
            keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: cfg.train_num_samples]
            train_x, train_y = train_x[keep], train_y[keep]
        self.full_val = (val_x, val_y)
        self.image_size = tuple(train_x.shape[-2:])
        if cfg.val_num_samples:
            val_x, val_y = val_x[: cfg.val_num_samples], val_y[: cfg.val_num_samples]
        common = dict(device=self.device, mean=cfg.mean, std=cfg.std, rank=self.rank, world_size=self.world_size)
        self.train_loader = TensorLoader(
            train_x, train_y, self.layout.per_process_batch, train=True, seed=cfg.seed, hflip=0.0 if cfg.no_aug else cfg.hflip,
            padding=0 if cfg.no_aug else cfg.crop_padding, **common)
        self.val_loader = self._eval_loader(val_x, val_y)

    def _eval_loader(self, images: torch.Tensor, labels: torch.Tensor) -> TensorLoader:
        cfg = self.cfg
        return TensorLoader(images, labels, cfg.validation_batch_size or self.layout.per_process_batch, train=False,
                            device=self.device, mean=cfg.mean, std=cfg.std, channels_last=self.channels_last,
                            rank=self.rank, world_size=self.world_size)

    def _build_model(self, precision_choice: Optional[dict] = None) -> None:
        """Model, task, optimiser, scheduler; trained in ``precision_choice`` (a resumed run's) or a new choice."""
        import lcnn_timm  # noqa: F401  (registers the LCNN models)

        cfg = self.cfg
        # the loss adds the curvature penalty; the model-side copy (for timm's train.py) would count it twice
        model_kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != "curvature_penalty"}
        try:
            model = create_model(cfg.model, pretrained=cfg.pretrained, num_classes=self.num_classes,
                                 in_chans=self.in_chans, drop_rate=cfg.drop, **model_kwargs)
        except (RuntimeError, OSError, ValueError, TypeError) as error:  # unknown name, bad kwarg, weights unreachable
            raise TrainSetupError(f"model {cfg.model!r}: {_first_line(error)}") from None
        if cfg.initial_checkpoint:
            try:
                load_timm_weights(model, cfg.initial_checkpoint)
            except (RuntimeError, OSError, KeyError) as error:  # wrong architecture, unreadable file
                raise TrainSetupError(f"initial_checkpoint {cfg.initial_checkpoint}: {_first_line(error)}") from None
        if cfg.convert:
            model = self._convert(model)
        model.to(self.device)
        self.model = model
        # before EMA, compile and DDP copy or wrap the model: they then see its final memory layout; a resumed
        # run keeps its cell, unless that is channels_last on a machine where this model crashes in it (issue 36)
        if precision_choice:
            choice = without_crashing_layout(PrecisionChoice.from_dict(precision_choice), model, self.device)
        else:
            choice = self._probe_precision()
        self._set_precision(choice)
        criterion = self._criterion(model)
        adversarial = (AdversarialConfig(cfg.adv_eps, cfg.adv_step, cfg.adv_steps, cfg.adv_true_labels)
                       if cfg.adv_training else None)
        self.task = LCNNTask(
            model, criterion, beta_weight=cfg.beta_weight, gamma_weight=cfg.gamma_weight,
            gradreg_weight=cfg.gradreg_weight, gradreg_mode=cfg.gradreg_mode, gradreg_scale=cfg.gradreg_scale,
            gradreg_fd_step=cfg.gradreg_fd_step, cure_weight=cfg.cure_weight, cure_scale=cfg.cure_scale,
            cure_step=cfg.cure_step, adversarial=adversarial, device=self.device)
        self.optimizer = create_optimizer_v2(param_groups(model, cfg.weight_decay), **optimizer_kwargs(cfg),
                                             **cfg.opt_kwargs)
        if cfg.gamma_cap:
            cap_gamma(model, self.optimizer, cfg.gamma_cap)
        self.scheduler, _ = create_scheduler_v2(self.optimizer, **scheduler_kwargs(cfg),
                                                updates_per_epoch=len(self.train_loader))
        if cfg.model_ema:
            self.task.setup_ema(decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)
        if cfg.torchcompile:
            self.task.compile(backend=cfg.torchcompile)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.task.prepare_distributed(device_ids=ids, find_unused_parameters=cfg.ddp_find_unused_parameters)

    def _criterion(self, model: nn.Module) -> nn.Module:
        """Cross-entropy, or the certified-margin loss on the model's head when ``certified_margin > 0``."""
        cfg = self.cfg
        if not cfg.certified_margin:
            return nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
        if cfg.smoothing:
            raise TrainSetupError("smoothing and certified_margin do not combine: the certified-margin loss is "
                                  "cross-entropy on margin-shifted logits, without label smoothing")
        try:
            return LipschitzMarginLoss(model.get_classifier(), cfg.certified_margin, cfg.certified_temperature)
        except ValueError as error:
            raise TrainSetupError(f"certified_margin: {error}") from None

    def _probe_precision(self) -> PrecisionChoice:
        """The precision and layout: as configured, or (``auto``) measured on the first training batch."""
        cfg = self.cfg
        self.train_loader.set_epoch(0)
        images, labels = next(iter(self.train_loader))
        choice = choose_precision(cfg.amp, cfg.amp_dtype, cfg.channels_last, unwrap_model(self.model), images, labels)
        if self.world_size > 1:  # every rank must train alike: rank 0's measurement decides
            shared = [choice]
            dist.broadcast_object_list(shared, src=0)
            choice = shared[0]
        return choice

    def _set_precision(self, choice: PrecisionChoice) -> None:
        """Train, evaluate and calibrate in ``choice``'s autocast dtype and memory layout from now on."""
        self.choice, self.precision, self.channels_last = choice, choice.precision, choice.channels_last
        self.model.to(memory_format=torch.channels_last if choice.channels_last else torch.contiguous_format)
        self.train_loader.channels_last = self.val_loader.channels_last = choice.channels_last
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "float16")
        self.autocast = contextlib.nullcontext if self.precision is None else \
            (lambda: torch.autocast(self.device.type, dtype=getattr(torch, self.precision)))

    def _convert(self, model: nn.Module) -> nn.Module:
        """LCNN-ify a stock timm model (``convert: true``) at the dataset's input size."""
        from ..convert import convert_model

        size = (self.in_chans, *self.image_size)
        try:
            model, report = convert_model(model, input_size=size, beta=self.cfg.convert_beta,
                                          function_preserving=self.cfg.convert_function_preserving)
        except (RuntimeError, ValueError, TypeError) as error:
            raise TrainSetupError(f"convert: {self.cfg.model!r} at input {size}: {_first_line(error)}") from None
        if self.primary:
            print(f"converted {self.cfg.model} to an LCNN (input {size}):\n{report.summary()}", flush=True)
        return model

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        ema = self.task.get_trainable_module(ema=True)
        return {
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "epoch_seconds": self.epoch_seconds,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
            "meter": self.meter.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "config": vars(self.cfg), "precision_choice": self.choice.as_dict(),
            "layout": self.layout.as_dict(), "layout_history": self.layout_history,
        }

    def save(self) -> None:
        """Checkpoint the current position (rank 0 writes; every rank waits for it)."""
        if self.primary:
            weights = unwrap_model(self.model).state_dict()
            try:
                save_checkpoint(self.out_dir, self.step, weights, self._state(), previous=self.last_checkpoint)
            except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
                if self.last_checkpoint:
                    kept = (f"the previous one, {self.last_checkpoint}, is intact. Free space (or fix the folder) "
                            "and resume with --resume")
                else:  # nothing to resume: --resume would refuse
                    kept = ("no earlier checkpoint exists. Free space (or fix the folder) and run the same command "
                            "again: it starts from the beginning")
                reason = getattr(error, "strerror", None) or str(error).rpartition("I/O error: ")[2] or str(error)
                raise CheckpointWriteError(
                    f"could not write the checkpoint of step {self.step} in {self.out_dir}: {reason}; {kept}"
                ) from None
        self.last_checkpoint = checkpoint_path(self.out_dir, self.step)  # every rank knows it: one message names it
        self.last_save_time = time.monotonic()
        if self.world_size > 1:
            dist.barrier()

    def _find_checkpoint(self, resume: str) -> Optional[Tuple[Path, Dict[str, torch.Tensor], dict]]:
        """The checkpoint ``resume`` names, read: 'latest' (bare ``--resume``: the output folder's checkpoint, which
        must exist), 'auto' (the same, or None for a new run if there is none) or a folder / .safetensors path.
        An unreadable newest checkpoint falls back to the previous one."""
        where = resume_folder(self.cfg)
        candidates = checkpoint_candidates(where)
        if not candidates:
            if resume == "auto":
                if self.primary:
                    print(f"resume: auto: no checkpoint in {where} yet; starting a new run", flush=True)
                return None
            raise TrainSetupError(resume_problem(self.cfg))
        problems = []
        for index, path in enumerate(candidates):
            try:
                weights, state = load_checkpoint(path)
                break
            except CheckpointError as error:
                problems.append(str(error))
                if self.primary and index + 1 < len(candidates):  # say so only where an older one exists
                    print(f"resume: {error}; trying an older checkpoint", file=sys.stderr, flush=True)
        else:
            raise TrainSetupError(f"--resume: no readable checkpoint in {where}: {'; '.join(problems)}")
        return path, weights, state

    def _load_checkpoint(self, path: Path, weights: Dict[str, torch.Tensor], state: dict) -> None:
        """Continue the run of a checkpoint found by :meth:`_find_checkpoint` exactly where it stopped."""
        model = unwrap_model(self.model)
        mismatch = describe_mismatch(model.state_dict(), weights)
        if mismatch:
            raise TrainSetupError(f"--resume: {path} does not fit model {self.cfg.model!r} with this config: "
                                  f"{mismatch}. Resume with the config that trained it")
        model.load_state_dict(weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if state["ema"] is not None and self.task.has_ema():
            self.task.get_trainable_module(ema=True).load_state_dict(state["ema"])
        self.meter.load_state_dict(state["meter"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.epoch_seconds = state["epoch_seconds"]
        self.rows = [row for row in read_metrics(self.out_dir / "metrics.jsonl") if row["epoch"] < self.epoch]
        self.last_checkpoint = path
        if self.primary:
            print(f"resumed from {path} at epoch {self.epoch}, batch {self.batch}", flush=True)

    # ---------------------------------------------------------------- loop
    def _lcnn_means(self) -> Dict[str, float]:
        log_betas, log_gammas = lcnn_parameters(unwrap_model(self.model))
        out = {}
        if log_betas:
            out["mean_beta"] = torch.stack([b.detach().exp() for b in log_betas]).mean().item()
        if log_gammas:
            out["mean_gamma"] = torch.stack([g.detach().exp() for g in log_gammas]).mean().item()
        return out

    def _recovery_due(self) -> bool:
        """Whether the step about to run should end with a mid-epoch checkpoint (never on an epoch's last step)."""
        interval, after = self.cfg.recovery_interval, self.batch + 1
        if after >= len(self.train_loader) or interval == 0:
            return False
        if interval is None:
            return time.monotonic() - self.last_save_time >= RECOVERY_SECONDS
        return after % interval == 0

    def _agree(self, loss: torch.Tensor, parts: Dict[str, torch.Tensor]) -> None:
        """Check the loss is finite and settle whether to checkpoint or stop after this step, on every rank alike.

        One all-reduce carries all three flags: the recovery clock is rank 0's; a signal on any rank stops all.
        """
        flags = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0,
                              float(self.primary and self._recovery_due()),
                              float(self.world_size > 1 and self.stop_signal is not None)])
        if self.world_size > 1:
            dist.all_reduce(flags)
        self.save_after_step, self.stop_after_step = bool(flags[1] > 0), bool(flags[2] > 0)
        if flags[0] > 0:
            terms = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            kept = self.last_checkpoint or "none (no checkpoint written yet)"
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {self.epoch}, batch {self.batch} (step {self.step}); "
                f"terms on rank {self.rank}: {terms or 'n/a'}. Stopped before the update; last good checkpoint: {kept}. "
                "Lower lr or the regulariser weights, or enable clip_grad.")

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One optimisation step; returns the task's detached outputs."""
        with self.autocast():
            result = self.task(images, labels)
        parts = {k: v for k, v in result.items() if k not in ("loss", "output")}
        self._agree(result["loss"], parts)
        self.scaler.scale(result["loss"]).backward()
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            from timm.utils import dispatch_clip_grad
            dispatch_clip_grad(self.task.get_clip_parameters(), self.cfg.clip_grad, mode=self.cfg.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task.update_ema(step=self.step)
        self.scheduler.step_update(num_updates=self.step)
        return {"loss": result["loss"].detach(), "output": result["output"].detach(), **parts}

    def train_epoch(self) -> None:
        """Run the rest of the current epoch."""
        loader = self.train_loader
        loader.set_epoch(self.epoch, self.batch)
        bar = tqdm(total=len(loader), initial=self.batch, desc=f"epoch {self.epoch}", disable=not
                   (self.primary and self.cfg.progress), leave=False, dynamic_ncols=True)
        self.task.train()
        for images, labels in loader:
            if self.world_size == 1 and self.stop_signal is not None:
                # one process stops between steps, after the step the handler named; a signal during a step
                # lets that step finish (DDP ranks agree through _agree's all-reduce instead)
                self._stop_mid_epoch(bar)
            start = time.perf_counter()
            self.running_step = self.step + 1  # the step a signal now lets finish (named by the handler)
            result = self.train_step(images, labels)
            self.running_step = None
            self.epoch_seconds += time.perf_counter() - start
            accuracy = (result.pop("output").argmax(1) == labels).float().mean()
            self.meter.update({**result, "train_acc": accuracy}, len(labels))
            self.batch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(result['loss']):.4f}")
            if self.stop_after_step:
                self._stop_mid_epoch(bar)
            if self.save_after_step:
                self.save()
        bar.close()

    def _stop_mid_epoch(self, bar: tqdm) -> None:
        """Checkpoint the current position and raise :class:`TrainingInterrupted`."""
        self.save()
        bar.close()
        raise TrainingInterrupted(self.stop_signal or "a signal on another rank",
                                  f"at epoch {self.epoch}, batch {self.batch} (step {self.step})", self.last_checkpoint)

    @torch.no_grad()
    def evaluate(self, loader: TensorLoader, ema: bool = False, model: Optional[nn.Module] = None) -> Dict[str, float]:
        """Accuracy and mean CE on ``loader`` of ``model`` (default: the unwrapped model, or its EMA), summed over
        ranks."""
        model = unwrap_model(self.task.get_trainable_module(ema=ema)) if model is None else model
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for images, labels in loader:
            with self.autocast():
                logits = model(images)
            totals += torch.tensor([(logits.argmax(1) == labels).sum().item(),
                                    nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item(),
                                    len(labels)], dtype=torch.float64)
        model.train(was_training)
        if self.world_size > 1:
            dist.all_reduce(totals)
        return {"acc": totals[0].item() / totals[2].item(), "loss": totals[1].item() / totals[2].item()}

    def bn_description(self) -> str:
        """Which BatchNorm statistics evaluations use (printed beside every validation/test figure)."""
        batches = self.cfg.precise_bn_batches
        return f"BN statistics re-estimated on {batches} training batches" if batches else "running BN statistics"

    def _calibrated_model(self) -> nn.Module:
        """The model with the BN statistics the final evaluation uses: with ``precise_bn_batches``, a copy whose
        statistics are re-estimated (cached for the current step), else the model itself."""
        model = unwrap_model(self.model)
        if not self.cfg.precise_bn_batches:
            return model
        if self._calibrated is None or self._calibrated[0] != self.step:
            calibrated = copy.deepcopy(model)
            self.recalibrate_batchnorm(self.cfg.precise_bn_batches, calibrated)
            self._calibrated = (self.step, calibrated)
        return self._calibrated[1]

    def _end_epoch(self) -> None:
        cfg = self.cfg
        row = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"], **self.meter.means(),
               **self._lcnn_means()}
        row["images_per_s"] = self.train_loader.num_samples * self.world_size / max(self.epoch_seconds, 1e-9)
        row["epoch_seconds"] = self.epoch_seconds
        row["precision"] = self.precision or "float32"
        row["precision_choice"] = self.choice.as_dict()
        row["layout"] = self.layout.as_dict()
        last = self.epoch + 1 == cfg.epochs
        if self.world_size > 1:  # ranks saw different batches: average their BN statistics (timm's dist_bn reduce)
            for ema in (False, True):
                if self.task.get_trainable_module(ema=ema) is not None:
                    distribute_bn(self.task.get_trainable_module(ema=ema), self.world_size, reduce=True)
        if (self.epoch + 1) % cfg.val_interval == 0 or last:
            val = self.evaluate(self.val_loader, model=self._calibrated_model())
            row.update(val_acc=val["acc"], val_loss=val["loss"], val_images=len(self.val_loader.images),
                       val_bn=self.bn_description())
        self.rows.append(row)
        self.epoch, self.batch = self.epoch + 1, 0
        self.meter, self.epoch_seconds = MeanMeter(), 0.0
        self.scheduler.step(self.epoch)
        if self.primary:
            write_metrics(self.out_dir / "metrics.jsonl", self.rows)
            if cfg.plot:
                plot_metrics(self.rows, self.out_dir)
            tqdm.write(_epoch_line(row, cfg.epochs))
        self.save()

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: int, model: Optional[nn.Module] = None) -> None:
        """"Precise BN": converge the spectral norms' singular vectors of ``model`` (default: the trained model),
        then replace its running statistics by their plain average over ``batches`` training batches.

        Short runs end with running statistics that lag the fast-moving early
        weights (eval accuracy far below train-mode accuracy); long runs do not need it.
        """
        model = unwrap_model(self.model) if model is None else model
        # eval mode divides by the Rayleigh quotient of the stored singular vectors, which one power step per
        # training forward can leave far from converged (13% low in the quick config without it): converge
        # them first, so the statistics are those of the network as it is evaluated and saved
        refresh_spectral_norms(model)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
        was_training = model.training
        model.train()
        self.train_loader.set_epoch(self.cfg.epochs)
        with frozen_state(model, batchnorm_stats=False):
            for index, (images, _) in enumerate(self.train_loader):
                if index == batches:
                    break
                with self.autocast():
                    model(images)
        model.train(was_training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        if self.world_size > 1:
            distribute_bn(model, self.world_size, reduce=True)

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        """SIGINT/SIGTERM set ``stop_signal`` (acted on after the current step) instead of killing the run; a second
        one acts at once, except under torchrun. Only the main thread can install handlers: elsewhere this does
        nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        launched = "TORCHELASTIC_RUN_ID" in os.environ

        def request_stop(signum, frame):
            if self.stop_signal is not None:  # torchrun forwards a Ctrl-C its terminal already sent: one stop
                return
            self.stop_signal = signal.Signals(signum).name
            if not launched:  # under torchrun, stopping at once is its own job (SIGKILL after its shutdown timeout)
                signal.signal(signum, previous[signum])
            if self.primary:
                # a single process stops after the step under way (or the one just done); DDP ranks agree on the
                # step at their next all-reduce, which may be one later
                if self.world_size > 1:
                    what = "finishing the current step"
                else:
                    what = f"finishing step {self.running_step}" if self.running_step else \
                        f"stopping after step {self.step}"
                again = "" if launched else " (send it again to stop at once, without one)"
                print(f"\n{self.stop_signal}: {what} and saving a checkpoint{again}", file=sys.stderr, flush=True)

        for sig in signals:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig in signals:
                signal.signal(sig, previous[sig])

    def _any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over the ranks."""
        value = torch.tensor([float(flag)])
        if self.world_size > 1:
            dist.all_reduce(value)
        return bool(value.item() > 0)

    def _stop_agreed(self) -> bool:
        return self._any_rank(self.stop_signal is not None)

    def fit(self) -> Dict[str, float]:
        """Train to ``epochs``, evaluate clean test accuracy, write final weights and ``final_eval.json``.

        Raises :class:`TrainingInterrupted` after checkpointing on SIGINT/SIGTERM (or, on a second Ctrl-C,
        at once with the last checkpoint written). Frees the run folder's lock however it ends.
        """
        try:
            self._record_layout()
            if self.primary:  # the resolved config, this launch's layout and precision cell, from the start
                atomic_write_text(self.out_dir / "config.json",
                                  json.dumps({**vars(self.cfg), "layout": self.layout.as_dict(),
                                              "precision_choice": self.choice.as_dict()}, indent=2))
            return self._fit_locked()
        finally:
            self.release()

    def _fit_locked(self) -> Dict[str, float]:
        try:
            with self._signals_deferred():
                while self.epoch < self.cfg.epochs:
                    self.train_epoch()
                    self._end_epoch()
                    if self._stop_agreed():  # a signal during the epoch-end evaluation: the epoch is saved
                        raise TrainingInterrupted(self.stop_signal or "a signal on another rank",
                                                  f"after epoch {self.epoch - 1}", self.last_checkpoint)
        except KeyboardInterrupt:
            raise TrainingInterrupted("SIGINT", f"at epoch {self.epoch}, batch {self.batch} (second Ctrl-C)",
                                      self.last_checkpoint) from None
        try:
            return self._finish()
        except KeyboardInterrupt:  # the training is checkpointed: resuming redoes only the final evaluation
            raise TrainingInterrupted("SIGINT", "during the final evaluation", self.last_checkpoint) from None

    def _finish(self) -> Dict[str, float]:
        if self.cfg.precise_bn_batches:
            unwrap_model(self.model).load_state_dict(self._calibrated_model().state_dict())
            self._calibrated = None
        full_val = self._eval_loader(*self.full_val)
        result = {"model": self.cfg.model, "dataset": self.cfg.dataset, "split": self.cfg.val_split,
                  "epochs": self.cfg.epochs, "test_images": len(full_val.images), "bn": self.bn_description(),
                  "precision": self.precision or "float32", "precision_choice": self.choice.as_dict(),
                  "layout": self.layout.as_dict(), "layout_history": self.layout_history}
        result.update({f"test_{k}": v for k, v in self.evaluate(full_val).items()})
        if self.task.has_ema():
            result.update({f"test_ema_{k}": v for k, v in self.evaluate(full_val, ema=True).items()})
        # what "spectrally normalised" means for the saved weights: 1 once precise BN converged the vectors, above
        # 1 where the training's one power step per forward lagged the weights
        norms = normalized_layer_norms(unwrap_model(self.model))
        if norms:
            result["normalized_layer_norm_max"] = max(norms.values())
        if self.primary:
            save_weights(self.out_dir / "model.safetensors", unwrap_model(self.model).state_dict())
            if self.task.has_ema():
                save_weights(self.out_dir / "model_ema.safetensors",
                             unwrap_model(self.task.get_trainable_module(ema=True)).state_dict())
            atomic_write_text(self.out_dir / "final_eval.json", json.dumps(result, indent=2))
            if self.cfg.plot:
                plot_metrics(self.rows, self.out_dir, final=result)
        return result


def _epoch_line(row: dict, epochs: int) -> str:
    """The per-epoch progress line: what each accuracy measures is said beside it."""
    parts = [f"epoch {row['epoch'] + 1}/{epochs}: loss {row['loss']:.4f}",
             f"train_acc {row['train_acc']:.3f} (augmented batches, BN in training mode)"]
    if "val_acc" in row:
        parts.append(f"val_acc {row['val_acc']:.3f} (first {row['val_images']} test images, {row['val_bn']})")
    parts.append(f"{row['images_per_s']:.0f} images/s, {row['epoch_seconds']:.0f} s")
    return ", ".join(parts)


def train(cfg: TrainConfig, lock: Optional[RunLock] = None) -> Dict[str, float]:
    """Run (or resume) a whole training run; returns the final clean test evaluation. ``lock``: the run folder's,
    already held (rank 0 of ``lcnn-timm train``); the trainer takes it over."""
    trainer = Trainer(cfg, lock)
    try:
        return trainer.fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
