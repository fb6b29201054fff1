"""Training configuration: timm ``train.py`` key names plus the LCNN keys.

A YAML file maps keys to values (``model: lcnn_resnet18``); command-line
overrides use the same names (``--lr 0.05`` or ``--batch-size 64``). Keys of
timm's ``train.py`` that only configure timm's own PIL data pipeline are
accepted and ignored (so one YAML serves both trainers); any other unknown
key is an error naming the closest valid keys.
"""
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

__all__ = ["TIMM_PIPELINE_KEYS", "TrainConfig", "load_config", "parse_overrides"]

# timm train.py keys for its PIL/worker pipeline; the tensor pipeline has no use for them
TIMM_PIPELINE_KEYS = frozenset({
    "scale", "ratio", "color_jitter", "color_jitter_prob", "grayscale_prob", "gaussian_blur_prob",
    "interpolation", "train_interpolation", "crop_pct", "train_crop_mode", "workers", "pin_mem",
    "no_prefetcher", "log_interval", "input_img_mode", "dataset_download", "use_multi_epochs_loader",
    "device_modules", "checkpoint_hist", "eval_metric", "reprob", "remode", "recount",
})


@dataclass
class TrainConfig:
    """Every key ``lcnn-timm train`` understands, with its default."""

    # data (timm names)
    dataset: str = "fashion_mnist"
    data_dir: Optional[str] = None
    train_split: str = "train"
    val_split: str = "test"
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    hflip: float = 0.5
    no_aug: bool = False
    # model
    model: str = "lcnn_resnet18"
    pretrained: bool = False
    initial_checkpoint: Optional[str] = None  # weights loaded before convert (timm train.py's name); moves with --output
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    img_size: Optional[int] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    convert: bool = False  # LCNN-ify the (stock timm) model with lcnn_timm.convert_model before training
    convert_function_preserving: bool = False
    convert_beta: Optional[float] = None  # initial softplus beta of a conversion; unset: convert_model's default
    drop: float = 0.0
    channels_last: Optional[bool] = None  # None ('auto'): the faster layout in the start-up probe
    torchcompile: Optional[str] = None
    # optimiser and schedule
    opt: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    sched: str = "multistep"
    sched_on_updates: bool = False
    epochs: int = 200
    decay_milestones: List[int] = field(default_factory=lambda: [150, 175])
    decay_epochs: float = 100
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False
    cooldown_epochs: int = 0
    min_lr: float = 0.0
    smoothing: float = 0.0
    # batches, precision, devices
    batch_size: int = 128  # the global batch, split over the processes (lcnn_timm.train.layout)
    batch_size_scope: str = "global"  # 'per_process': batch_size is each process's share (timm train.py's meaning)
    validation_batch_size: Optional[int] = None
    amp: Optional[bool] = None  # None ('auto'): bf16 where native and measured >= 10% faster, else fp32
    amp_dtype: str = "bfloat16"
    device: Optional[str] = None
    seed: int = 42
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    # output and checkpoints
    output: str = ""
    experiment: str = ""
    resume: str = ""
    allow_world_size_change: bool = False  # resume at another world size, keeping the checkpoint's global batch
    recovery_interval: Optional[int] = None  # None: every 10 min of training; N: every N steps; 0: epoch ends only
    val_interval: int = 1
    # LCNN keys
    beta_weight: float = 0.0
    gamma_weight: float = 0.0
    gamma_cap: float = 0.0  # > 0: gamma <= gamma_cap in every gamma-BN after each step (lcnn_timm.certify.cap_gamma)
    certified_margin: float = 0.0  # > 0: certified-margin loss (lcnn_timm.train.certified_loss) instead of CE
    certified_temperature: float = 10.0
    gradreg_weight: float = 0.0
    gradreg_mode: str = "exact"
    gradreg_scale: float = 1e5
    gradreg_fd_step: float = 1e-3
    cure_weight: float = 0.0
    cure_scale: float = 1e3
    cure_step: float = 1.0
    adv_training: bool = False
    adv_eps: float = 0.1
    adv_step: float = 0.01
    adv_steps: int = 3
    adv_true_labels: bool = False
    crop_padding: int = 4
    ddp_find_unused_parameters: bool = False
    precise_bn_batches: int = 0
    plot: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"amp_dtype must be 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if self.batch_size_scope not in ("global", "per_process"):
            raise ValueError(f"batch_size_scope must be 'global' or 'per_process', got {self.batch_size_scope!r}")
        positive = dict(epochs=self.epochs, batch_size=self.batch_size, val_interval=self.val_interval)
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# keys whose null value is spelt 'auto': decided by lcnn_timm.train.precision's start-up probe
AUTO_KEYS = ("amp", "channels_last")


KEYS_TABLE_START, KEYS_TABLE_END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def keys_table() -> str:
    """Markdown table of every config key and its default, generated from :class:`TrainConfig` (docs/training.md
    holds it between ``KEYS_TABLE_START`` and ``KEYS_TABLE_END``; a test regenerates it and fails on drift)."""
    rows = ["| key | default |", "|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "auto" if f.name in AUTO_KEYS else ("unset" if default is None else default)
        rows.append(f"| `{f.name}` | `{shown}` |" if shown not in ("", "unset") else f"| `{f.name}` | {shown or 'empty'} |")
    return "\n".join(rows)


def _check_type(key: str, value: Any) -> Any:
    """Coerce YAML scalars to the field's type (int -> float is fine); refuse the rest clearly."""
    default = _FIELDS[key].default
    if default is dataclasses.MISSING:
        default = _FIELDS[key].default_factory()
    annotation = str(_FIELDS[key].type)
    if value is None:
        if "Optional" in annotation or default is None:
            return None
        raise ValueError(f"config key {key!r} cannot be null")
    kind = type(default) if default is not None else None
    if kind is None:  # Optional[...]: infer from the annotation
        kind = next((k for k in (list, dict, bool, int, float, str) if k.__name__ in annotation.lower()), None)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads '1e-3' (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is list and isinstance(value, (list, tuple)):
        return list(value)
    if kind is not None and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"config key {key!r} expects {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _normalise_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def _unknown_key_error(key: str) -> ValueError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(_FIELDS))}"
    return ValueError(f"unknown config key {key!r}{hint}")


def parse_overrides(argv: Sequence[str]) -> Dict[str, Any]:
    """``['--lr', '0.05', '--amp']`` -> ``{'lr': 0.05, 'amp': True}`` (values parsed as YAML)."""
    overrides: Dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ValueError(f"expected an option like --key value, got {token!r}")
        key, _, inline = token[2:].partition("=")
        if inline:
            overrides[_normalise_key(key)] = yaml.safe_load(inline)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides[_normalise_key(key)] = yaml.safe_load(argv[i + 1])
            i += 2
        else:  # a bare flag
            overrides[_normalise_key(key)] = True
            i += 1
    return overrides


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Read a YAML file (timm ``train.py`` format), apply ``overrides`` and validate every key."""
    values: Dict[str, Any] = {}
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update({_normalise_key(k): v for k, v in loaded.items()})
    overrides = dict(overrides or {})
    _follow_output(values, overrides)
    values.update(overrides)
    kwargs = {}
    for key, value in values.items():
        if key in TIMM_PIPELINE_KEYS:
            continue
        if key not in _FIELDS:
            raise _unknown_key_error(key)
        if key == "resume" and value is True:  # bare --resume: continue the output folder's run, which must exist
            value = "latest"
        if key in AUTO_KEYS and value == "auto":
            value = None
        kwargs[key] = _check_type(key, value)
    cfg = TrainConfig(**kwargs)
    _check_model_penalty(cfg)
    return cfg


def _follow_output(file_values: Dict[str, Any], overrides: Dict[str, Any]) -> None:
    """A file's ``initial_checkpoint`` inside its own ``output`` folder (another run of the same configs, e.g. the
    conversion row's source) moves with an ``output`` override, unless the override also names the checkpoint."""
    checkpoint, output = file_values.get("initial_checkpoint"), file_values.get("output")
    if "output" not in overrides or "initial_checkpoint" in overrides or not (checkpoint and output):
        return
    try:
        inside = Path(checkpoint).relative_to(output)
    except ValueError:
        return
    overrides["initial_checkpoint"] = str(Path(overrides["output"]) / inside)


def penalty_weights(value: Sequence[float]) -> Tuple[float, float]:
    """Validate a ``(beta_weight, gamma_weight)`` pair (the ``curvature_penalty`` model argument)."""
    try:
        beta_weight, gamma_weight = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"curvature_penalty must be a pair (beta_weight, gamma_weight), got {value!r}") from None
    if beta_weight < 0 or gamma_weight < 0:
        raise ValueError(f"curvature_penalty weights must be >= 0, got {value!r}")
    return beta_weight, gamma_weight


def _check_model_penalty(cfg: TrainConfig) -> None:
    """``model_kwargs.curvature_penalty`` applies the penalty inside the model, for timm's ``train.py``.

    Here the loss adds it (``beta_weight``/``gamma_weight``) and the trainer drops the model argument, so the two
    must agree: one YAML then trains the same way under both trainers.
    """
    if "curvature_penalty" not in cfg.model_kwargs:
        return
    weights = penalty_weights(cfg.model_kwargs["curvature_penalty"])
    if weights != (cfg.beta_weight, cfg.gamma_weight):
        raise ValueError(
            f"model_kwargs.curvature_penalty {list(weights)} disagrees with beta_weight {cfg.beta_weight} / "
            f"gamma_weight {cfg.gamma_weight}: set them equal (the model-side penalty is for timm's train.py; "
            "lcnn-timm train adds beta_weight/gamma_weight to its loss)"
        )
