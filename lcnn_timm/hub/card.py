"""Model cards: generated from ``hub_cards/TEMPLATE.md``, a repository's ``config.json`` and its ``results.json``.

Cards are never edited by hand. ``render_card_for_folder`` builds the README of one repository folder,
``regenerate_cards`` rewrites every ``hub_cards/<name>/README.md``.

``results.json`` as read here (schema_version 1 or 2, written by ``lcnn-timm evaluate``)::

    {"schema_version": 2, "model": ..., "dataset": {"name": "fashion_mnist", "split": "test"},
     "metrics": {
       "accuracy": {"value": 91.2, "count": 10000},                       # percent
       "curvature": {"count": 1000, "iterations": 10, "eps": 1e-6,
                     "curvature": {"mean": .., "std": ..}, "gradient_norm": {...}, "hessian_norm": {...}},
       "pgd": [{"norm": "l2", "eps": 0.05, "steps": 10, "step_size": 0.0125, "restarts": 1,
                "accuracy": 80.1, "count": 10000}, ...]}}

Every metric is optional; each one present becomes a model-index entry and a table row with its protocol.
"""
import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from ..evaluation.results import READABLE_SCHEMA_VERSIONS, check_schema_version, curvature_protocol

__all__ = ['Metric', 'metrics_from_results', 'render_card', 'render_card_for_folder', 'regenerate_cards',
           'CARD_META_KEY', 'TEMPLATE_PATH', 'SUPPORTED_RESULTS_VERSIONS']

# config.json entry (ignored by timm's loader) holding what the card needs beyond timm's own fields
CARD_META_KEY = 'lcnn_timm'
# a symlink to hub_cards/TEMPLATE.md in the source tree; setuptools copies the file itself into the wheel
TEMPLATE_PATH = Path(__file__).parent / 'TEMPLATE.md'
SUPPORTED_RESULTS_VERSIONS = READABLE_SCHEMA_VERSIONS

# results.json dataset name -> (Hub dataset id for the card's `datasets:` field, display name)
_DATASETS = {
    'cifar100': ('uoft-cs/cifar100', 'CIFAR-100'),
    'cifar10': ('uoft-cs/cifar10', 'CIFAR-10'),
    'fashion_mnist': ('zalando-datasets/fashion_mnist', 'Fashion-MNIST'),
    'svhn': ('ufldl-stanford/svhn', 'SVHN'),
}

_LCNN_METHOD = (
    'Low-Curvature Neural Network (LCNN): centered softplus activations with a learnable, penalised curvature β, '
    'γ-Lipschitz BatchNorm, and spectral normalisation of each convolution\'s true operator norm, which together '
    'keep the paper\'s curvature expression small (Srinivas et al., NeurIPS 2022).')
_LCNN_WITHOUT_BN_METHOD = (
    'Low-Curvature Neural Network (LCNN) without BatchNorm: activations made of the centered softplus with a '
    'learnable, penalised curvature β, and spectral normalisation of each layer\'s true operator norm, so that every '
    'layer is 1-Lipschitz and the Hessian of every logit difference has a small certified bound (Srinivas et al., '
    'NeurIPS 2022; lcnn-timm docs/certificates.md).')
_BASELINE_METHOD = (
    'a baseline of the LCNN paper\'s comparison (Srinivas et al., NeurIPS 2022), not a low-curvature model: '
    'its curvature is not bounded by construction.')


@dataclass(frozen=True)
class Metric:
    """One measured number: its model-index ``type``, the row label, the value, a spread, and how it was measured."""
    type: str
    name: str
    value: float
    protocol: str
    std: Optional[float] = None
    fmt: str = '.2f'

    def formatted(self) -> str:
        text = format(self.value, self.fmt)
        return text if self.std is None else f'{text} ± {format(self.std, self.fmt)}'


def _dataset(results: Dict[str, Any]) -> Dict[str, str]:
    ds = results.get('dataset') or {}
    ds = {'name': ds} if isinstance(ds, str) else dict(ds)
    hub_id, display = _DATASETS.get(ds.get('name', ''), (ds.get('name', 'unknown'), ds.get('name', 'unknown')))
    return {'name': ds.get('name', 'unknown'), 'split': ds.get('split', 'test'), 'hub_id': hub_id, 'display': display}


def _dataset_from_config(train_config_text: Optional[str]) -> Dict[str, Any]:
    """``{'dataset': {'name', 'split'}}`` from a training YAML's ``dataset``/``val_split`` (for a card without
    results.json, which said "trained on unknown"), or nothing."""
    import yaml

    from ..data import resolve_dataset_name

    try:
        config = yaml.safe_load(train_config_text or '') or {}
    except yaml.YAMLError:
        return {}
    name = resolve_dataset_name(config.get('dataset')) if isinstance(config, dict) and config.get('dataset') else None
    return {'dataset': {'name': name, 'split': config.get('val_split', 'test')}} if name else {}


def metrics_from_results(results: Dict[str, Any]) -> List[Metric]:
    """The card's metrics, in table order, from a parsed results.json (see the module docstring for its schema)."""
    version = check_schema_version(results)
    ds = _dataset(results)
    where = f'{ds["display"]} {ds["split"]}'
    metrics = results.get('metrics') or {}
    out: List[Metric] = []
    acc = metrics.get('accuracy')
    if acc:
        out.append(Metric('accuracy', 'Clean top-1 accuracy (%)', acc['value'], f'{where}, {acc["count"]} images'))
    curv = metrics.get('curvature')
    if curv:
        protocol = (f'{where}, {curv["count"]} images, {curvature_protocol(curv, version)}, '
                    f'f = cross-entropy at the true label, pixels in [0, 1], eps = {curv["eps"]:g}; mean ± std over images')
        for key, mtype, name in (
                ('curvature', 'normalized_curvature', 'E C_f (normalized curvature)'),
                ('gradient_norm', 'input_gradient_norm', 'E ‖∇f‖₂'),
                ('hessian_norm', 'input_hessian_norm', 'E ‖∇²f‖₂')):
            if key in curv:
                out.append(Metric(mtype, name, curv[key]['mean'], protocol, curv[key].get('std'), '.4g'))
    for attack in metrics.get('pgd') or []:
        norm = attack['norm'].upper()
        protocol = (f'{where}, {attack["count"]} images, {norm} PGD, {attack["steps"]} steps of '
                    f'{attack["step_size"]:g}, {attack.get("restarts", 1)} restart(s)')
        out.append(Metric(f'pgd_{attack["norm"].lower()}_accuracy', f'{norm} PGD accuracy (%), ε = {attack["eps"]:g}',
                          attack['accuracy'], protocol))
    certified = metrics.get('certified') or {}
    for level in certified.get('levels') or []:
        protocol = (f'{where}, {certified["count"]} images, guaranteed: no input within L2 distance ε changes the '
                    f'prediction; first-order {level["first_order"]:.2f}, curvature-based {level["curvature"]:.2f} '
                    '(docs/certificates.md)')
        out.append(Metric('certified_l2_accuracy', f'Certified L2 accuracy (%), ε = {level["eps"]:g}',
                          level['combined'], protocol))
    return out


def _curvature_estimator(results: Dict[str, Any]) -> str:
    """The estimator of the card's ``||H||``: schema-1 results were measured by power iteration, later ones by Lanczos."""
    return 'power iteration' if results and check_schema_version(results) == 1 else 'Lanczos'


def _front_matter(model_name: str, metrics: List[Metric], ds: Dict[str, str], license: str) -> str:
    meta: Dict[str, Any] = {
        'library_name': 'timm',
        'pipeline_tag': 'image-classification',
        'license': license,
        'tags': ['image-classification', 'timm', 'lcnn', 'robustness', 'low-curvature', 'lcnn-timm'],
        'datasets': [ds['hub_id']],
    }
    if metrics:
        meta['model-index'] = [{
            'name': model_name,
            'results': [{
                'task': {'type': 'image-classification', 'name': 'Image Classification'},
                'dataset': {'name': ds['display'], 'type': ds['hub_id'], 'split': ds['split']},
                'metrics': [{'type': m.type, 'name': m.name, 'value': m.value} for m in metrics],
            }],
        }]
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()


def _results_table(metrics: List[Metric]) -> str:
    if not metrics:
        return 'No evaluation results were supplied with this checkpoint.'
    rows = ['| Metric | Value | Protocol |', '|---|---|---|']
    rows += [f'| {m.name} | {m.formatted()} | {m.protocol} |' for m in metrics]
    return '\n'.join(rows)


def render_card(
        *,
        repo_id: str,
        architecture: str,
        num_classes: int,
        description: Optional[str] = None,
        is_lcnn: bool = True,
        gamma_bn: bool = True,
        curvature_proxy: Optional[float] = None,
        input_size: List[int],
        results: Optional[Dict[str, Any]] = None,
        train_config_text: Optional[str] = None,
        train_config_name: Optional[str] = None,
        license: str = 'apache-2.0',
        template: Union[str, Path] = TEMPLATE_PATH,
) -> str:
    """The model card (README.md) text for one published model."""
    results = results or {}
    metrics = metrics_from_results(results) if results else []
    ds = _dataset(results if results.get('dataset') else _dataset_from_config(train_config_text))
    model_name = repo_id.split('/')[-1]
    kind = 'Low-Curvature Neural Network' if is_lcnn else 'baseline of the LCNN paper\'s comparison'
    notes = results.get('notes')
    if train_config_text is not None:
        recipe = (f'Trained with `lcnn-timm train --config {train_config_name or "train.yaml"}` '
                  f'(a copy is in this repository as `train.yaml`):\n\n```yaml\n{train_config_text.rstrip()}\n```')
    else:
        recipe = 'No training config was published with this checkpoint.'
    fields = {
        'front_matter': _front_matter(model_name, metrics, ds, license),
        'title': f'{model_name}: {"a low-curvature" if is_lcnn else "a baseline"} `{architecture}`',
        'summary': (f'`{architecture}` ({description or kind}) image classifier trained on {ds["display"]}, '
                    f'published with lcnn-timm in timm\'s format.'),
        'method': (_LCNN_METHOD if gamma_bn else _LCNN_WITHOUT_BN_METHOD) if is_lcnn else _BASELINE_METHOD,
        'architecture': architecture,
        'num_classes': num_classes,
        'input_size': 'x'.join(str(s) for s in input_size),
        'dataset_name': ds['display'],
        'repo_id': repo_id,
        'results_table': _results_table(metrics),
        'protocol_notes': '\n\n'.join(filter(None, [
            f'Notes from the evaluation: {notes}' if notes else '',
            (f'The paper\'s Theorem-1 curvature expression (sum of betas times products of Lipschitz constants, '
             f'the quantity LCNN training keeps small; not an upper bound on the normalized curvature), from the '
             f'weights in eval mode: {curvature_proxy:.4g}.') if curvature_proxy is not None else '',
        ])),
        'train_recipe': recipe,
        'curvature_estimator': _curvature_estimator(results),
    }
    return string.Template(Path(template).read_text(encoding='utf-8')).substitute(fields)


def render_card_for_folder(folder: Union[str, Path], template: Union[str, Path] = TEMPLATE_PATH) -> str:
    """The card for a repository folder holding ``config.json`` and optionally ``results.json`` / ``train.yaml``."""
    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    meta = config.get(CARD_META_KEY) or {}
    if 'repo_id' not in meta:
        raise ValueError(f'{folder / "config.json"} has no "{CARD_META_KEY}.repo_id": write it with lcnn-timm push.')
    results_path, train_path = folder / 'results.json', folder / 'train.yaml'
    return render_card(
        repo_id=meta['repo_id'],
        architecture=config['architecture'],
        num_classes=config['num_classes'],
        description=config['pretrained_cfg'].get('description'),
        is_lcnn=meta.get('lcnn', True),
        gamma_bn=meta.get('gamma_bn', True),
        curvature_proxy=meta.get('curvature_proxy'),
        input_size=config['pretrained_cfg']['input_size'],
        results=json.loads(results_path.read_text(encoding='utf-8')) if results_path.is_file() else None,
        train_config_text=train_path.read_text(encoding='utf-8') if train_path.is_file() else None,
        train_config_name=meta.get('train_config'),
        license=meta.get('license', 'apache-2.0'),
        template=template,
    )


def regenerate_cards(root: Union[str, Path] = 'hub_cards', template: Union[str, Path] = TEMPLATE_PATH) -> List[Path]:
    """Rewrite ``README.md`` in every ``root/<name>/`` that holds a ``config.json``; return the cards written."""
    written = []
    for folder in sorted(p.parent for p in Path(root).glob('*/config.json')):
        card, tmp = folder / 'README.md', folder / '.README.md.tmp'
        # UTF-8 explicitly: the card has non-ASCII symbols and the locale's default encoding may be ASCII
        tmp.write_text(render_card_for_folder(folder, template), encoding='utf-8')
        os.replace(tmp, card)
        written.append(card)
    return written
