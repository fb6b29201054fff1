"""``lcnn-timm push``: write a checkpoint as a timm-layout Hub repository with its model card, and upload it."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

import yaml

from .push import DEFAULT_COMMIT_MESSAGE, HubError, push_checkpoint

# timm train.py config keys that fix how the model is built
_MODEL_KEYS = ('num_classes', 'in_chans', 'img_size')
# the organisation a dry run's card names when no --repo-id is given
PLACEHOLDER_ORG = 'your-org'


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='lcnn-timm push', description=__doc__.replace('``', "'"))
    p.add_argument('checkpoint', help='weights to publish (.safetensors from lcnn-timm train, or a timm .pth)')
    p.add_argument('--model', required=True, help='registered timm architecture, e.g. lcnn_resnet18')
    p.add_argument('--repo-id', help=f'Hub repository, ORG/REPO (required unless --dry-run; a dry run without it '
                                     f'names {PLACEHOLDER_ORG}/<--out folder name> in the card)')
    p.add_argument('--results', help='results.json from lcnn-timm evaluate (the card is built from it)')
    p.add_argument('--config', help='training YAML; published as train.yaml, shown in the card, and read for '
                                    'model_kwargs / num_classes / in_chans / img_size')
    p.add_argument('--num-classes', type=int, help='default: the config, else the checkpoint classifier size')
    p.add_argument('--in-chans', type=int, help='default: the config, else the checkpoint first conv')
    p.add_argument('--img-size', type=int, help='default: the config, else the architecture default')
    p.add_argument('--label-names', help='JSON list of class names (default: the architecture pretrained cfg)')
    p.add_argument('--license', default='apache-2.0', help='Hub license id for the card (default apache-2.0)')
    p.add_argument('--private', action='store_true', help='create the repository as private')
    p.add_argument('--revision', help='branch to commit to (must exist on the Hub)')
    p.add_argument('--commit-message', help=f'default: "{DEFAULT_COMMIT_MESSAGE}"')
    p.add_argument('--dry-run', action='store_true', help='only write the repository folder (needs --out)')
    p.add_argument('--out', help='folder to write the repository to (kept after an upload too)')
    return p


def _model_kwargs(args: argparse.Namespace) -> dict:
    cfg = {}
    if args.config:
        try:
            cfg = yaml.safe_load(Path(args.config).read_text(encoding='utf-8')) or {}
        except (OSError, yaml.YAMLError) as e:
            raise HubError(f'--config {args.config!r} could not be read as YAML: {e}') from e
    model_kwargs = cfg.get('model_kwargs') or {}
    if not isinstance(model_kwargs, dict):
        raise HubError(f'--config {args.config!r}: model_kwargs must be a mapping, got {model_kwargs!r}')
    kwargs = dict(model_kwargs)
    for key in _MODEL_KEYS:  # top-level keys win over model_kwargs, as in timm's train.py
        kwargs[key] = cfg[key] if cfg.get(key) is not None else kwargs.get(key)
    if kwargs['img_size'] is None and cfg.get('input_size'):
        kwargs['in_chans'] = kwargs['in_chans'] or cfg['input_size'][0]
        kwargs['img_size'] = cfg['input_size'][-1]
    kwargs.update({k: getattr(args, k) for k in _MODEL_KEYS if getattr(args, k) is not None})
    return kwargs


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repo_id is None:
        if not (args.dry_run and args.out):
            parser.error('--repo-id ORG/REPO is required (a --dry-run with --out can do without)')
        args.repo_id = f'{PLACEHOLDER_ORG}/{Path(args.out).resolve().name}'
        print(f'dry run without --repo-id: the card names the placeholder {args.repo_id}')
    try:
        label_names = json.loads(Path(args.label_names).read_text(encoding='utf-8')) if args.label_names else None
        commit = push_checkpoint(
            args.checkpoint, args.model, args.repo_id,
            results=args.results, train_config=args.config, out_dir=args.out, dry_run=args.dry_run,
            private=args.private, revision=args.revision, commit_message=args.commit_message,
            label_names=label_names, license=args.license, **_model_kwargs(args),
        )
    except (ValueError, FileNotFoundError) as e:  # the user's input: exit 2, as train and evaluate
        print(f'lcnn-timm push: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # the machine or the network
        print(f'lcnn-timm push: error: {e}', file=sys.stderr)
        return 1
    if commit is None:
        print(f'wrote {args.out} (dry run: nothing uploaded)')
    else:
        print(f'pushed {args.repo_id}: {getattr(commit, "commit_url", commit)}')
    return 0
