"""Write a model as a Hugging Face Hub repository in timm's layout, check such a folder, and upload it.

Layout (what ``timm.create_model("hf-hub:ORG/REPO", pretrained=True)`` and ``local-dir:DIR`` read):
``config.json`` (architecture, num_classes, label_names, model_args, pretrained_cfg; written by timm's own
``save_for_hf``), ``model.safetensors``, ``README.md`` (the generated model card) and, when given, the
``results.json`` the card is built from and the training config as ``train.yaml``.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.models import load_state_dict, parse_model_name, save_for_hf

from ..curvature import UnsupportedStructureError, curvature_proxy
from ..curvature.penalty import lcnn_parameters
from ..layers.spectral_norm import canonical_weight_keys
from ..train.checkpoint import default_file_mode
from .card import CARD_META_KEY, render_card_for_folder

__all__ = [
    'HubError', 'HubAuthError', 'load_checkpoint', 'read_weights', 'check_state_dict', 'create_model_from_checkpoint',
    'write_repo_folder', 'verify_repo_folder', 'load_pretrained', 'resolve_token', 'upload_repo_folder',
    'push_checkpoint', 'DEFAULT_COMMIT_MESSAGE',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
RESULTS_NAME = 'results.json'
TRAIN_CONFIG_NAME = 'train.yaml'
DEFAULT_COMMIT_MESSAGE = 'Upload {model} weights and model card with lcnn-timm'
LOGIN_HELP = (
    'No Hugging Face token found. Log in with `hf auth login` (stores a token) or set the HF_TOKEN '
    'environment variable to a token with write access (https://huggingface.co/settings/tokens); '
    'use --dry-run --out DIR to only write the repository folder.'
)


class HubError(ValueError):
    """A checkpoint, repository folder or push request that cannot be used, with the reason and the fix."""


class HubAuthError(HubError):
    """No Hugging Face token is available for an upload."""


def _registry_hint(name: str) -> str:
    close = [m for m in timm.list_models(f'*{name.split(".")[0][:6]}*')][:8]
    hint = f' Similar registered names: {", ".join(close)}.' if close else ''
    return (f'architecture {name!r} is not registered in timm.{hint} '
            'LCNN models are registered by `import lcnn_timm`; list them with timm.list_models("lcnn_*").')


def load_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch checkpoint (EMA weights preferred, as timm does)."""
    path = Path(path)
    if not path.is_file():
        raise HubError(f'checkpoint {str(path)!r} does not exist or is not a file.')
    try:
        return load_state_dict(str(path))
    except SafetensorError as e:
        raise HubError(f'checkpoint {str(path)!r} is not a readable safetensors file (corrupt or truncated?): {e}') from e
    except Exception as e:  # torch.load raises many types (pickle, zip, EOF) for a damaged file
        raise HubError(f'checkpoint {str(path)!r} could not be read as a torch/safetensors checkpoint: {e}') from e


def check_state_dict(
        model: torch.nn.Module,
        state_dict: Dict[str, torch.Tensor],
        source: str,
        ignore_missing: Sequence[str] = (),
) -> None:
    """Raise HubError naming the missing, unexpected and mis-shaped tensors when ``state_dict`` does not fit ``model``.

    Model tensors whose names start with one of ``ignore_missing`` may be absent (e.g. a classifier being replaced).
    """
    # spectrally normalised weights load from either key (docs/layers.md): compare in one naming
    expected = canonical_weight_keys(model.state_dict())
    state_dict = canonical_weight_keys(state_dict)
    missing = [k for k in expected if k not in state_dict and not k.startswith(tuple(ignore_missing))]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f'{k}: {tuple(state_dict[k].shape)} there, {tuple(v.shape)} in the model'
        for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mis_shaped):
        return
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
    parts = [f'{source} does not match architecture {arch!r} (a checkpoint of another architecture, or other '
             f'num_classes / in_chans / img_size?).']
    for label, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mis_shaped)):
        if keys:
            parts.append(f'{len(keys)} {label}: {", ".join(keys[:4])}{" ..." if len(keys) > 4 else ""}.')
    raise HubError(' '.join(parts))


def _tensor_dim(state_dict: Dict[str, torch.Tensor], module_name: Optional[str], dim: int) -> Optional[int]:
    """Size ``dim`` of a module's weight in a checkpoint, plain or spectrally normalised."""
    if not module_name:
        return None
    weight = canonical_weight_keys(state_dict).get(f'{module_name}.weight')
    return int(weight.shape[dim]) if weight is not None and weight.ndim > dim else None


def create_model_from_checkpoint(
        model_name: str,
        checkpoint: Union[str, Path],
        **model_kwargs: Any,
) -> torch.nn.Module:
    """Build registered ``model_name`` and load ``checkpoint`` into it (eval mode), checking that it fits.

    ``num_classes`` and ``in_chans`` default to the sizes of the checkpoint's classifier and first conv.
    """
    if not timm.is_model(model_name):
        raise HubError(_registry_hint(model_name))
    state_dict = load_checkpoint(checkpoint)
    default_cfg = timm.models.get_pretrained_cfg(model_name)
    default_cfg = default_cfg.to_dict() if default_cfg is not None else {}
    first_conv = default_cfg.get('first_conv')
    first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
    inferred = {
        'num_classes': _tensor_dim(state_dict, default_cfg.get('classifier'), 0),
        'in_chans': _tensor_dim(state_dict, first_conv, 1),
    }
    for key, value in inferred.items():
        if value is not None and model_kwargs.get(key) is None:
            model_kwargs[key] = value
    model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    try:
        model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    except TypeError as e:
        raise HubError(f'cannot build {model_name!r} with {model_kwargs}: {e}') from e
    check_state_dict(model, state_dict, f'checkpoint {str(checkpoint)!r}')
    model.load_state_dict(state_dict)
    return model.eval()


def write_repo_folder(
        model: torch.nn.Module,
        out_dir: Union[str, Path],
        *,
        repo_id: str,
        results: Optional[Union[str, Path]] = None,
        train_config: Optional[Union[str, Path]] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
) -> List[str]:
    """Write ``model`` as a timm-layout Hub repository in ``out_dir``; return the sorted file names written.

    Files are first written to a temporary folder beside ``out_dir`` and then moved in one by one with
    ``os.replace``, so an interruption never leaves a half-written file under its final name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_betas, log_gammas = lcnn_parameters(model)
    try:
        proxy = curvature_proxy(model)
    except UnsupportedStructureError:
        proxy = None  # e.g. a converted timm model with plain residual adds: the card then omits it
    model_config: Dict[str, Any] = {CARD_META_KEY: {
        'repo_id': repo_id,
        'license': license,
        # learnable betas and no BatchNorm outside gamma-BN (a BN-free model such as lcnn_lipcnn has no gammas)
        'lcnn': bool(log_betas) and (bool(log_gammas) or not any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())),
        'gamma_bn': bool(log_gammas),
        'curvature_proxy': proxy,
        # as the user named it (e.g. configs/x.yaml); an absolute path would leak the local file system
        'train_config': (Path(train_config).name if Path(train_config).is_absolute() else str(train_config))
        if train_config else None,
    }}
    cfg_labels = model.pretrained_cfg.get('label_names')
    if label_names is None and cfg_labels and len(cfg_labels) == model.num_classes:
        label_names = cfg_labels
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise HubError(f'{len(label_names)} label names given for a model with {model.num_classes} classes.')
        model_config['label_names'] = list(label_names)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f'.{out_dir.name}.') as tmp:
        tmp = Path(tmp)
        # timm's own exporter writes config.json and model.safetensors exactly as its loaders expect
        save_for_hf(model, tmp, model_config=model_config, safe_serialization=True)
        if results:
            shutil.copyfile(results, tmp / RESULTS_NAME)
        if train_config:
            shutil.copyfile(train_config, tmp / TRAIN_CONFIG_NAME)
        (tmp / 'README.md').write_text(render_card_for_folder(tmp), encoding='utf-8')
        names = sorted(p.name for p in tmp.iterdir())
        stale = {RESULTS_NAME, TRAIN_CONFIG_NAME} - set(names)
        for name in names:
            os.chmod(tmp / name, default_file_mode())  # safetensors creates model.safetensors 0600, the rest 0644
            os.replace(tmp / name, out_dir / name)
    for name in stale:  # a re-push without --results / --config must not publish the previous run's files
        (out_dir / name).unlink(missing_ok=True)
    return names


def _read_config(folder: Path) -> Dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise HubError(f'{str(path)!r} is missing: not a timm-layout model repository.')
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise HubError(f'{str(path)!r} is not valid JSON: {e}') from e
    if not isinstance(cfg, dict) or 'architecture' not in cfg:
        raise HubError(f'{str(path)!r} has no "architecture" entry.')
    return cfg


def read_weights(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """A weights file's tensors (safetensors, else any checkpoint timm reads); HubError if missing or unreadable."""
    path = Path(path)
    if path.suffix != '.safetensors':
        return load_checkpoint(path)
    if not path.is_file():
        raise HubError(f'{str(path)!r} is missing: there are no weights to load.')
    try:
        with safe_open(str(path), framework='pt') as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise HubError(f'{str(path)!r} is corrupt or truncated ({e}); re-run `lcnn-timm push` or re-download it.') from e


def verify_repo_folder(folder: Union[str, Path], model: Optional[torch.nn.Module] = None) -> Dict[str, Any]:
    """Check a timm-layout repository folder; return its config.json.

    Raises HubError for a missing/invalid config.json, an architecture that is not registered, and a
    missing, corrupt, truncated or mismatching ``model.safetensors``. The weights are checked against
    ``model`` when given, else against the architecture built from config.json.
    """
    folder = Path(folder)
    cfg = _read_config(folder)
    arch = cfg['architecture']
    if not timm.is_model(arch):
        raise HubError(f'{str(folder / CONFIG_NAME)!r} names an unknown model: {_registry_hint(arch)}')
    state_dict = read_weights(folder / WEIGHTS_NAME)
    if model is None:
        model_args = dict(cfg.get('model_args') or {})
        model_args.setdefault('num_classes', cfg.get('num_classes'))
        model = timm.create_model(arch, pretrained=False, **{k: v for k, v in model_args.items() if v is not None})
    check_state_dict(model, state_dict, str(folder / WEIGHTS_NAME))
    return cfg


def _repo_folder(model_name: str) -> Path:
    """The local folder holding ``model_name``'s files: a local-dir path, or the Hub cache snapshot (downloaded if needed)."""
    from huggingface_hub import hf_hub_download

    source, model_id = parse_model_name(model_name)
    if source == 'local-dir':
        return Path(model_id)
    if source is None:
        cfg = timm.models.get_pretrained_cfg(model_id)
        model_id = cfg.hf_hub_id if cfg is not None else None
        if not model_id:
            raise HubError(f'{model_name!r} has no hf_hub_id to load pretrained weights from.')
    repo_id, _, revision = model_id.partition('@')
    config_path = hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None, library_name='lcnn-timm')
    hf_hub_download(repo_id, WEIGHTS_NAME, revision=revision or None, library_name='lcnn-timm')
    return Path(config_path).parent


def load_pretrained(model_name: str, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=True)``, with a clear HubError when the repository is bad.

    ``model_name`` is ``hf-hub:ORG/REPO``, ``local-dir:DIR`` or a registered ``arch.tag`` with an ``hf_hub_id``.
    The repository is only examined when timm fails (a good one is loaded once, by timm's own code path);
    a corrupt or truncated weights file, an unregistered architecture or weights of another architecture
    then raise HubError naming the cause instead of timm's/safetensors' traceback.
    """
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except HubError:
        raise  # the LCNN models check their weights themselves
    except Exception as error:
        failure = error
    # outside the except block, so a HubError does not drag timm's traceback along as its context
    verify_repo_folder(_repo_folder(model_name))
    raise failure


def resolve_token(token: Optional[str] = None) -> str:
    """The token to upload with: ``token``, else HF_TOKEN, else the stored ``hf auth login`` token."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubAuthError(LOGIN_HELP)
    return token


def upload_repo_folder(
        folder: Union[str, Path],
        repo_id: str,
        *,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Upload model with lcnn-timm',
) -> Any:
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit; return the commit info."""
    from huggingface_hub import HfApi

    api = HfApi(token=resolve_token(token), library_name='lcnn-timm')
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message,
    )


def push_checkpoint(
        checkpoint: Union[str, Path],
        model_name: str,
        repo_id: str,
        *,
        results: Optional[Union[str, Path]] = None,
        train_config: Optional[Union[str, Path]] = None,
        out_dir: Optional[Union[str, Path]] = None,
        dry_run: bool = False,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        label_names: Optional[Sequence[str]] = None,
        license: str = 'apache-2.0',
        **model_kwargs: Any,
) -> Optional[Any]:
    """Build the repository folder for ``checkpoint`` (in ``out_dir`` if given) and, unless ``dry_run``, upload it.

    Returns huggingface_hub's commit info, or None for a dry run. Without a token the upload fails before
    anything is built or sent.
    """
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise HubError(f'--repo-id must be ORG/REPO, got {repo_id!r}.')
    if dry_run and out_dir is None:
        raise HubError('--dry-run needs --out DIR: the folder to write the repository to.')
    for label, path in (('results', results), ('config', train_config)):
        if path and not Path(path).is_file():
            raise HubError(f'--{label} {str(path)!r} does not exist.')
    token = None if dry_run else resolve_token()
    model = create_model_from_checkpoint(model_name, checkpoint, **model_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        write_repo_folder(model, folder, repo_id=repo_id, results=results, train_config=train_config,
                          label_names=label_names, license=license)
        verify_repo_folder(folder, model)
        if dry_run:
            return None
        return upload_repo_folder(folder, repo_id, token=token, private=private, revision=revision,
                                  commit_message=commit_message or DEFAULT_COMMIT_MESSAGE.format(model=model_name))
