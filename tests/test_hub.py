"""Publishing to the Hub, fully offline: push --dry-run, loading through a hand-built Hugging Face cache,
a mocked upload (the only thing mocked), clear errors for broken repositories, cards equal to results.json."""
import json
import os
import re
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

import lcnn_timm
from lcnn_timm.curvature import curvature_penalty, curvature_proxy
from lcnn_timm.data import load_fashion_mnist
from lcnn_timm.hub import HubError, load_pretrained, regenerate_cards, verify_repo_folder
from lcnn_timm.hub.cli import main as push_main
from lcnn_timm.layers import CenteredSoftplus, GammaBatchNorm2d, spectral_norm
from lcnn_timm.layers.spectral_norm import canonical_weight_keys

REPO_ID = 'lcnn-test/tiny-lcnn'
LABELS = ['zero', 'one', 'two']
FILES = ['README.md', 'config.json', 'model.safetensors', 'results.json', 'train.yaml']


class TinyLCNN(nn.Module):
    """SN conv -> gamma-BN -> centered softplus -> pool -> SN linear: the LCNN ingredients, tiny."""

    def __init__(self, num_classes=3, in_chans=1, img_size=8, width=4, global_pool='avg'):
        super().__init__()
        self.num_classes, self.in_chans, self.num_features, self.global_pool = num_classes, in_chans, width, global_pool
        self.conv = spectral_norm(nn.Conv2d(in_chans, width, 3, padding=1), input_size=to_2tuple(img_size))
        self.bn = GammaBatchNorm2d(width)
        self.act = CenteredSoftplus()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = spectral_norm(nn.Linear(width, num_classes))

    def bound_chain(self):
        return list(self.named_children())

    def forward(self, x):
        for _, layer in self.bound_chain():
            x = layer(x)
        return x


_CFG = dict(num_classes=3, input_size=(1, 8, 8), mean=(0.5,), std=(0.5,), first_conv='conv', classifier='fc',
            label_names=LABELS)
default_cfgs = generate_default_cfgs({
    'hubtest_tiny_lcnn.hubtest': dict(hf_hub_id=REPO_ID, **_CFG),
    'hubtest_tiny_lcnn_wide.hubtest': dict(**_CFG),
})


@register_model
def hubtest_tiny_lcnn(pretrained=False, **kwargs):
    return build_model_with_cfg(TinyLCNN, 'hubtest_tiny_lcnn', pretrained, **kwargs)


@register_model
def hubtest_tiny_lcnn_wide(pretrained=False, **kwargs):
    return build_model_with_cfg(TinyLCNN, 'hubtest_tiny_lcnn_wide', pretrained, **dict(kwargs, width=6))


def _results(acc=81.25, shift=0.0):
    return {
        'schema_version': 1, 'model': 'hubtest_tiny_lcnn', 'dataset': {'name': 'fashion_mnist', 'split': 'test'},
        'metrics': {
            'accuracy': {'value': acc, 'count': 64},
            'curvature': {'count': 32, 'iterations': 10, 'eps': 1e-6,
                          'curvature': {'mean': 3.2571 + shift, 'std': 1.125},
                          'gradient_norm': {'mean': 0.4821, 'std': 0.0713},
                          'hessian_norm': {'mean': 1.5702, 'std': 0.4419}},
            'pgd': [{'norm': 'l2', 'eps': eps, 'steps': 10, 'step_size': eps / 4, 'restarts': 1,
                     'accuracy': acc - 10 * i - shift, 'count': 64} for i, eps in enumerate((0.05, 0.1, 0.15, 0.2), 1)],
        },
    }


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny LCNN trained for a few steps, its safetensors checkpoint, and its `push --dry-run` folder."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp('hub')
    model = timm.create_model('hubtest_tiny_lcnn', num_classes=3, in_chans=1)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y) + curvature_penalty(model).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    bound = curvature_proxy(model)
    ckpt = tmp / 'last.safetensors'
    save_file(model.state_dict(), ckpt)
    (tmp / 'results.json').write_text(json.dumps(_results()))
    (tmp / 'train.yaml').write_text('model: hubtest_tiny_lcnn\nnum_classes: 3\nin_chans: 1\nepochs: 1\nlr: 0.1\n')
    out = tmp / 'repo'
    rc = push_main([str(ckpt), '--model', 'hubtest_tiny_lcnn', '--repo-id', REPO_ID, '--results',
                    str(tmp / 'results.json'), '--config', str(tmp / 'train.yaml'), '--dry-run', '--out', str(out)])
    assert rc == 0
    return dict(tmp=tmp, ckpt=ckpt, x=x, expected=expected, repo=out, bound=bound)


@pytest.fixture
def offline_cache(trained, tmp_path, monkeypatch):
    """The dry-run folder placed in a hand-built Hugging Face cache, with the Hub switched offline.

    huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE into `constants` at import time, so the constants
    themselves are patched (the environment too, for anything importing later).
    """
    return _offline_hub(tmp_path, monkeypatch, {REPO_ID: trained['repo']})[REPO_ID]


def _offline_hub(tmp_path, monkeypatch, repos):
    """A Hugging Face cache holding a copy of each ``{repo_id: folder}``, with the Hub switched offline;
    returns each repository's snapshot folder."""
    sha = 'a' * 40
    snapshots = {}
    for repo_id, folder in repos.items():
        repo = tmp_path / 'hub' / f'models--{repo_id.replace("/", "--")}'
        shutil.copytree(folder, repo / 'snapshots' / sha)
        (repo / 'refs').mkdir()
        (repo / 'refs' / 'main').write_text(sha)
        snapshots[repo_id] = repo / 'snapshots' / sha
    for name, value in (('HF_HUB_OFFLINE', '1'), ('HF_HUB_CACHE', str(tmp_path / 'hub'))):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    return snapshots


def _output(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_dry_run_writes_timm_layout(trained):
    repo = trained['repo']
    assert sorted(p.name for p in repo.iterdir()) == FILES
    # every file readable as a new file is (model.safetensors was 0600, the others 0644)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in repo.iterdir()} == dict.fromkeys(FILES, 0o666 & ~umask)
    cfg = json.loads((repo / 'config.json').read_text())
    assert cfg['architecture'] == 'hubtest_tiny_lcnn'
    assert cfg['num_classes'] == 3 and cfg['label_names'] == LABELS
    assert cfg['pretrained_cfg']['input_size'] == [1, 8, 8] and cfg['pretrained_cfg']['mean'] == [0.5]
    assert 'hf_hub_id' not in cfg['pretrained_cfg']  # the source is where it is loaded from, not stored
    assert cfg['lcnn_timm']['repo_id'] == REPO_ID and cfg['lcnn_timm']['lcnn'] is True
    assert cfg['lcnn_timm']['curvature_proxy'] == trained['bound'] > 0
    card = (repo / 'README.md').read_text()
    assert f'not an upper bound on the normalized curvature), from the weights in eval mode: {trained["bound"]:.4g}.' in card
    assert 'a low-curvature `hubtest_tiny_lcnn`' in card and 'arXiv}' in card and '77.42 ± 0.11' in card
    assert (repo / 'train.yaml').read_text() == (trained['tmp'] / 'train.yaml').read_text()


@pytest.mark.parametrize('name', ['hf-hub:' + REPO_ID, 'hubtest_tiny_lcnn.hubtest'])
def test_offline_hub_cache_loading_gives_identical_outputs(trained, offline_cache, name):
    model = timm.create_model(name, pretrained=True)
    assert torch.equal(_output(model, trained['x']), trained['expected'])
    assert torch.equal(_output(load_pretrained(name), trained['x']), trained['expected'])
    assert model.pretrained_cfg['label_names'] == LABELS


def test_local_dir_loading_gives_identical_outputs(trained):
    model = timm.create_model(f'local-dir:{trained["repo"]}', pretrained=True)
    assert torch.equal(_output(model, trained['x']), trained['expected'])


def test_card_usage_snippet_runs(trained, offline_cache):
    card = (trained['repo'] / 'README.md').read_text()
    snippet = re.search(r'```python\n(.*?)```', card, re.S).group(1)
    assert f'timm.create_model("hf-hub:{REPO_ID}", pretrained=True)' in snippet
    scope = {}
    exec(snippet, scope)
    assert torch.equal(scope['model'].fc.parametrizations.weight.original,
                       load_pretrained(f'local-dir:{trained["repo"]}').fc.parametrizations.weight.original)


class _Recorder:
    """Stands in for the two network calls of an upload; records what huggingface_hub was handed."""

    def __init__(self, monkeypatch):
        self.calls = []
        recorder = self

        def create_repo(api, repo_id, **kwargs):
            recorder.calls.append(('create_repo', repo_id, kwargs))
            return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')

        def upload_folder(api, **kwargs):
            files = sorted(p.name for p in __import__('pathlib').Path(kwargs['folder_path']).iterdir())
            recorder.calls.append(('upload_folder', files, kwargs, api.token))
            return 'commit-info'

        monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)


def _push_args(trained, *extra):
    return [str(trained['ckpt']), '--model', 'hubtest_tiny_lcnn', '--repo-id', REPO_ID,
            '--results', str(trained['tmp'] / 'results.json'), '--config', str(trained['tmp'] / 'train.yaml'), *extra]


def test_push_hands_exact_files_and_message_to_huggingface_hub(trained, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    rec = _Recorder(monkeypatch)
    assert push_main(_push_args(trained, '--private', '--revision', 'v1', '--commit-message', 'Tiny LCNN v1')) == 0
    (_, repo_id, repo_kwargs), (_, files, upload, token) = rec.calls
    assert repo_id == REPO_ID and repo_kwargs == {'private': True, 'exist_ok': True}
    assert files == FILES and token == 'hf_test_token'
    assert upload['repo_id'] == REPO_ID and upload['revision'] == 'v1' and upload['commit_message'] == 'Tiny LCNN v1'


def test_push_default_commit_message(trained, monkeypatch):
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    rec = _Recorder(monkeypatch)
    assert push_main(_push_args(trained)) == 0
    assert rec.calls[1][2]['commit_message'] == 'Upload hubtest_tiny_lcnn weights and model card with lcnn-timm'


def test_no_token_fails_before_any_upload(trained, tmp_path, monkeypatch, capsys):
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_TOKEN_PATH', str(tmp_path / 'no-token'))
    assert huggingface_hub.get_token() is None
    rec = _Recorder(monkeypatch)
    assert push_main(_push_args(trained, '--out', str(tmp_path / 'out'))) == 2
    err = capsys.readouterr().err
    assert 'hf auth login' in err and 'HF_TOKEN' in err
    assert rec.calls == [] and not (tmp_path / 'out').exists()


def _broken_copy(trained, tmp_path):
    repo = tmp_path / 'repo'
    shutil.copytree(trained['repo'], repo)
    return repo


@pytest.mark.parametrize('damage', ['truncate', 'garbage'])
def test_corrupt_weights_give_clear_errors(trained, tmp_path, damage, capsys):
    repo = _broken_copy(trained, tmp_path)
    weights = repo / 'model.safetensors'
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == 'truncate' else b'\x00' * 64)
    with pytest.raises(HubError, match='corrupt or truncated'):
        load_pretrained(f'local-dir:{repo}')
    # the same file given to push as a checkpoint
    assert push_main([str(weights), '--model', 'hubtest_tiny_lcnn', '--repo-id', REPO_ID,
                      '--dry-run', '--out', str(tmp_path / 'out')]) == 2
    assert 'not a readable safetensors file' in capsys.readouterr().err


def test_unregistered_architecture_gives_clear_error(trained, tmp_path):
    repo = _broken_copy(trained, tmp_path)
    cfg = json.loads((repo / 'config.json').read_text())
    cfg['architecture'] = 'lcnn_no_such_net'
    (repo / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(HubError, match=r"'lcnn_no_such_net' is not registered.*import lcnn_timm"):
        verify_repo_folder(repo)


def test_checkpoint_of_another_architecture_gives_clear_error(trained, tmp_path, capsys):
    rc = push_main([str(trained['ckpt']), '--model', 'hubtest_tiny_lcnn_wide', '--repo-id', REPO_ID,
                    '--dry-run', '--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match architecture 'hubtest_tiny_lcnn_wide'" in err and 'shape mismatch' in err
    rc = push_main([str(trained['ckpt']), '--model', 'hubtest_no_such_model', '--repo-id', REPO_ID,
                    '--dry-run', '--out', str(tmp_path / 'out')])
    assert rc == 2 and 'is not registered' in capsys.readouterr().err
    # a repository whose weights belong to another architecture, caught before timm's strict load
    repo = _broken_copy(trained, tmp_path)
    cfg = json.loads((repo / 'config.json').read_text())
    cfg['architecture'] = 'hubtest_tiny_lcnn_wide'
    (repo / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(HubError, match='does not match architecture'):
        load_pretrained(f'local-dir:{repo}')


def _card_parts(card):
    front = yaml.safe_load(card.split('---\n')[1])
    section = card.split('## Measured results\n')[1].split('\n## ')[0]
    rows = [r.split(' | ') for r in section.strip().splitlines() if r.startswith('| ') and '---' not in r][1:]
    table = {r[0].lstrip('| '): r[1] for r in rows}
    return front, table


def test_each_card_numbers_equal_its_results_json(trained, tmp_path):
    root = tmp_path / 'hub_cards'
    for name, results in (('tiny-a', _results()), ('tiny-b', _results(acc=77.5, shift=0.5))):
        shutil.copytree(trained['repo'], root / name)
        (root / name / 'results.json').write_text(json.dumps(results))
    cards = regenerate_cards(root)
    assert [c.parent.name for c in cards] == ['tiny-a', 'tiny-b']
    for card in cards:
        res = json.loads((card.parent / 'results.json').read_text())['metrics']
        front, table = _card_parts(card.read_text())
        assert front['library_name'] == 'timm' and {'lcnn', 'robustness', 'timm'} <= set(front['tags'])
        assert front['datasets'] == ['zalando-datasets/fashion_mnist']
        measured = {m['name']: m['value'] for m in front['model-index'][0]['results'][0]['metrics']}
        curv = res['curvature']
        expected = {
            'Clean top-1 accuracy (%)': (res['accuracy']['value'], None, '.2f'),
            'E C_f (normalized curvature)': (curv['curvature']['mean'], curv['curvature']['std'], '.4g'),
            'E ‖∇f‖₂': (curv['gradient_norm']['mean'], curv['gradient_norm']['std'], '.4g'),
            'E ‖∇²f‖₂': (curv['hessian_norm']['mean'], curv['hessian_norm']['std'], '.4g'),
            **{f'L2 PGD accuracy (%), ε = {a["eps"]:g}': (a['accuracy'], None, '.2f') for a in res['pgd']},
        }
        assert measured == {k: v for k, (v, _, _) in expected.items()}
        assert set(table) == set(expected)
        for name, (value, std, fmt) in expected.items():
            numbers = [float(n) for n in table[name].split(' ± ')]
            assert numbers == [float(format(v, fmt)) for v in (value, std) if v is not None]


def test_card_is_generated_not_edited(trained, tmp_path):
    root = tmp_path / 'hub_cards'
    shutil.copytree(trained['repo'], root / 'tiny')
    (root / 'tiny' / 'README.md').write_text('hand edit')
    regenerate_cards(root)
    assert (root / 'tiny' / 'README.md').read_text() == (trained['repo'] / 'README.md').read_text()


def test_unsupported_results_schema_is_a_clear_error(trained, tmp_path, capsys):
    (tmp_path / 'results.json').write_text(json.dumps({'schema_version': 99}))
    rc = push_main([str(trained['ckpt']), '--model', 'hubtest_tiny_lcnn', '--repo-id', REPO_ID, '--results',
                    str(tmp_path / 'results.json'), '--dry-run', '--out', str(tmp_path / 'out')])
    assert rc == 2 and 'schema_version 99 is not supported' in capsys.readouterr().err


def test_registry_lcnn_resnet18_round_trip(tmp_path):
    """The real registry model, pushed by tag: label names and input size from the tag, bound in the card."""
    from lcnn_timm.models._pretrained import FASHION_MNIST_LABEL_NAMES

    torch.manual_seed(0)
    model = timm.create_model('lcnn_resnet18.fmnist', img_size=8).eval()  # 8x8 keeps the SN power iterations cheap
    save_file(model.state_dict(), tmp_path / 'model.safetensors')
    out = tmp_path / 'repo'
    assert push_main([str(tmp_path / 'model.safetensors'), '--model', 'lcnn_resnet18.fmnist', '--img-size', '8',
                      '--repo-id', 'lcnn-test/lcnn_resnet18.fmnist', '--dry-run', '--out', str(out)]) == 0
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'lcnn_resnet18' and cfg['pretrained_cfg']['tag'] == 'fmnist'
    assert cfg['label_names'] == list(FASHION_MNIST_LABEL_NAMES) and cfg['pretrained_cfg']['input_size'] == [1, 8, 8]
    assert cfg['lcnn_timm']['curvature_proxy'] == curvature_proxy(model)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(_output(load_pretrained(f'local-dir:{out}'), x), _output(model, x))


def _published_tags():
    import lcnn_timm  # noqa: F401  (registers the models)

    return [name for name in timm.list_pretrained() if (timm.get_pretrained_cfg(name).hf_hub_id or '')
            .startswith('lcnn-timm/')]


@pytest.mark.parametrize('name', _published_tags())
def test_every_published_tag_has_a_staged_repository_that_loads(name):
    folder = Path(__file__).resolve().parents[1] / 'hub_cards' / name
    assert timm.get_pretrained_cfg(name).hf_hub_id == f'lcnn-timm/{name}'
    assert {'README.md', 'config.json', 'model.safetensors', 'results.json'} <= {p.name for p in folder.iterdir()}
    staged = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    tagged = timm.create_model(name, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors'))).eval()
    saved = canonical_weight_keys(safetensors.torch.load_file(str(folder / 'model.safetensors')))  # pre-2026-11-30 keys
    for model in (staged, tagged):
        assert model.state_dict().keys() == saved.keys()
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    x = torch.rand(4, *tagged.pretrained_cfg['input_size'])
    with torch.no_grad():
        assert torch.equal(staged(x), tagged(x))
    results = json.loads((folder / 'results.json').read_text())
    assert f"{results['metrics']['accuracy']['value']:.2f}" in (folder / 'README.md').read_text()


# The Fashion-MNIST zoo weights shipped with the package (lcnn_timm/pretrained/, links to hub_cards/<tag>/).
HUB_CARDS = Path(__file__).resolve().parent.parent / 'hub_cards'
SHIPPED = ['lcnn_resnet18_025.fmnist', 'lcnn_resnet18_025.fmnist_gradreg', 'lcnn_lipcnn.fmnist']


@pytest.fixture
def hub_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)


def _assert_state_dict_is_file(model, path):
    """Every tensor of the model is the file's, and the file has no other (a strict load).

    The shipped files predate the ``<layer>.weight`` key of spectrally normalised layers (their results.json
    records their sha256), so they hold torch's ``<layer>.parametrizations.weight.original``: both load.
    """
    saved = canonical_weight_keys(safetensors.torch.load_file(str(path)))
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_only_tags_with_weights_are_listed():
    assert timm.list_models(module=['cifar_resnet', 'cifar_vgg', 'lipschitz_cnn'], pretrained=True) == sorted(SHIPPED)
    assert sorted(p.name for p in lcnn_timm.models._pretrained.PRETRAINED_DIR.iterdir()) == \
        sorted(f'{tag}.safetensors' for tag in SHIPPED)


@pytest.mark.parametrize('tag', SHIPPED)
def test_shipped_weights_load_offline_and_strictly(tag, hub_offline):
    cfg = timm.get_pretrained_cfg(tag)
    assert cfg.hf_hub_id == f'lcnn-timm/{tag}'  # the Hub copy, used when no file is installed
    assert Path(cfg.file).resolve() == (HUB_CARDS / tag / 'model.safetensors').resolve()
    _assert_state_dict_is_file(timm.create_model(tag, pretrained=True), HUB_CARDS / tag / 'model.safetensors')


def test_shipped_weights_classify_fashion_mnist(hub_offline):
    """On the first 1000 test images, within 3 points of the accuracy results.json records for all 10000."""
    try:
        images, labels = load_fashion_mnist('test')
    except (FileNotFoundError, OSError) as error:
        pytest.skip(f'Fashion-MNIST is not installed: {error}')
    tag = SHIPPED[0]
    model = timm.create_model(tag, pretrained=True).eval()
    config = timm.data.resolve_data_config(model=model)
    assert config['mean'] == (0.0,) and config['std'] == (1.0,)  # raw [0, 1] pixels, as trained
    with torch.no_grad():
        correct = (model(images[:1000].float() / 255).argmax(1) == labels[:1000]).float().mean().item()
    recorded = json.loads((HUB_CARDS / tag / 'results.json').read_text())['metrics']['accuracy']['value']
    assert abs(100 * correct - recorded) < 3, (100 * correct, recorded)


def test_tag_falls_back_to_the_hub_without_the_file(tmp_path, monkeypatch):
    tag = SHIPPED[1]
    snapshot = _offline_hub(tmp_path, monkeypatch, {f'lcnn-timm/{tag}': HUB_CARDS / tag})[f'lcnn-timm/{tag}']
    model = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=dict(file=None))
    _assert_state_dict_is_file(model, snapshot / 'model.safetensors')
    _assert_state_dict_is_file(load_pretrained(f'hf-hub:lcnn-timm/{tag}'), snapshot / 'model.safetensors')


def _truncated(path, tmp_path):
    bad = tmp_path / 'model.safetensors'
    bad.write_bytes(Path(path).read_bytes()[:100_000])
    return bad


def test_corrupt_file_gives_the_same_error_as_load_pretrained(tmp_path, monkeypatch):
    tag = SHIPPED[0]
    bad = _truncated(HUB_CARDS / tag / 'model.safetensors', tmp_path)
    overlay = dict(pretrained_cfg_overlay=dict(file=str(bad)))
    with pytest.raises(HubError, match='corrupt or truncated') as plain:
        timm.create_model('cifar_resnet18_025.fmnist', pretrained=True, **overlay)  # the baseline: built in 0.1 s
    with pytest.raises(HubError) as checked:
        load_pretrained('cifar_resnet18_025.fmnist', **overlay)
    assert str(plain.value) == str(checked.value)
    # the same through the Hub cache: a corrupt download
    snapshot = _offline_hub(tmp_path / 'cache', monkeypatch, {f'lcnn-timm/{tag}': tmp_path})[f'lcnn-timm/{tag}']
    shutil.copy(HUB_CARDS / tag / 'config.json', snapshot / 'config.json')
    with pytest.raises(HubError, match='corrupt or truncated') as plain:
        timm.create_model(f'hf-hub:lcnn-timm/{tag}', pretrained=True)
    with pytest.raises(HubError) as checked:
        load_pretrained(f'hf-hub:lcnn-timm/{tag}')
    assert str(plain.value) == str(checked.value)


def test_wrong_architecture_and_channels_are_named():
    weights = str(HUB_CARDS / SHIPPED[0] / 'model.safetensors')
    with pytest.raises(HubError, match=r"does not match architecture 'cifar_resnet18_025'.*unexpected"):
        timm.create_model('cifar_resnet18_025.fmnist', pretrained=True, pretrained_cfg_overlay=dict(file=weights))
    with pytest.raises(HubError, match=r'in_chans.*shape mismatch: stem\.conv\.weight: '
                                       r'\(16, 1, 3, 3\) there, \(16, 3, 3, 3\) in the model'):
        timm.create_model(SHIPPED[0], pretrained=True, in_chans=3)
    # the head is replaced, not checked, when num_classes differs
    assert timm.create_model(SHIPPED[0], pretrained=True, num_classes=4).fc.out_features == 4


@pytest.mark.parametrize('tag, hint', [
    ('lcnn_resnet18.cifar100_gradreg', 'lcnn-timm reproduce --zoo cifar100'),
    ('lcnn_vgg11.fmnist', 'No zoo config trains lcnn_vgg11'),
])
def test_tags_without_weights_say_how_to_produce_them(tag, hint):
    with pytest.raises(RuntimeError, match=f'No pretrained weights exist for {re.escape(tag)}.*{hint}'):
        timm.create_model(tag, pretrained=True)


def test_load_pretrained_is_reachable_as_documented():
    import lcnn_timm as package
    assert package.hub.load_pretrained is load_pretrained


@pytest.mark.slow
def test_wheel_install_loads_the_tag_offline(tmp_path):
    """A wheel built from this tree, installed alone into an empty folder, loads the tag with the Hub offline."""
    import subprocess
    import sys
    root = tmp_path / 'src'  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    shutil.copytree(Path(__file__).resolve().parent.parent, root, symlinks=True, ignore=shutil.ignore_patterns(
        '.git', 'build', '*.egg-info', '__pycache__', 'tests', 'benchmarks', 'docs', 'results'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', str(root), '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(tmp_path / 'wheel')], check=True, cwd=tmp_path)
    wheel = next((tmp_path / 'wheel').glob('lcnn_timm-*.whl'))
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(tmp_path / 'site'),
                    str(wheel)], check=True, cwd=tmp_path)
    script = (
        'import sys, pathlib, timm, torch, safetensors.torch; sys.path.insert(0, sys.argv[1]); import lcnn_timm\n'
        'assert pathlib.Path(lcnn_timm.__file__).is_relative_to(sys.argv[1]), lcnn_timm.__file__\n'
        f'model = timm.create_model("{SHIPPED[0]}", pretrained=True)\n'
        'from lcnn_timm.layers.spectral_norm import canonical_weight_keys\n'
        'saved = canonical_weight_keys(safetensors.torch.load_file(sys.argv[2]))  # pre-2026-11-30 keys\n'
        'assert sorted(saved) == sorted(model.state_dict())\n'
        'assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())\n'
    )
    env = {k: v for k, v in __import__('os').environ.items() if k != 'PYTHONPATH'}
    env.update(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'empty_cache'))
    subprocess.run([sys.executable, '-c', script, str(tmp_path / 'site'),
                    str(HUB_CARDS / SHIPPED[0] / 'model.safetensors')], check=True, cwd=tmp_path, env=env)


def test_card_without_results_names_the_configs_dataset():
    """push --dry-run --config configs/... without results.json wrote a card "trained on unknown" (issue 25)."""
    from lcnn_timm.hub.card import render_card

    config = (Path(__file__).parents[1] / 'configs' / 'fashion_mnist_quick.yaml').read_text()
    card = render_card(repo_id='org/quick', architecture='lcnn_resnet18_025', num_classes=10, input_size=[1, 28, 28],
                       train_config_text=config, train_config_name='fashion_mnist_quick.yaml')
    assert 'trained on Fashion-MNIST' in card and 'unknown' not in card


def test_a_batchnorm_free_lcnn_is_carded_as_one():
    """lcnn_lipcnn has betas and no gamma-BN: its card was titled "a baseline ... not a low-curvature model"."""
    config = json.loads((HUB_CARDS / 'lcnn_lipcnn.fmnist' / 'config.json').read_text())
    assert config['lcnn_timm']['lcnn'] is True and config['lcnn_timm']['gamma_bn'] is False
    card = (HUB_CARDS / 'lcnn_lipcnn.fmnist' / 'README.md').read_text()
    assert 'a low-curvature `lcnn_lipcnn`' in card and 'without BatchNorm' in card and 'baseline' not in card
    baseline = json.loads((HUB_CARDS / 'lcnn_resnet18_025.fmnist' / 'config.json').read_text())
    assert baseline['lcnn_timm']['lcnn'] is True  # betas and gamma-BN: unchanged


@pytest.mark.parametrize('version, estimator', [(1, 'power iteration'), (2, 'Lanczos')])
def test_the_limitations_name_the_estimator_that_measured_the_curvature(version, estimator):
    """Every card said 'power iteration'; the evaluator has used Lanczos since schema 2."""
    from lcnn_timm.hub.card import render_card

    card = render_card(repo_id=REPO_ID, architecture='hubtest_tiny_lcnn', num_classes=3, input_size=[1, 8, 8],
                       results={**_results(), 'schema_version': version})
    assert f'empirical estimates on the stated examples ({estimator} and PGD)' in card


def test_docs_give_push_s_exit_status_for_an_unusable_checkpoint(tmp_path, capsys):
    """docs/hub.md said 1; push exits 2 for a checkpoint it cannot use, as train and evaluate."""
    rc = push_main([str(tmp_path / 'missing.safetensors'), '--model', 'hubtest_tiny_lcnn', '--repo-id', REPO_ID,
                    '--dry-run', '--out', str(tmp_path / 'out')])
    assert 'does not exist' in capsys.readouterr().err
    docs = (Path(__file__).resolve().parents[1] / 'docs' / 'hub.md').read_text(encoding='utf-8')
    assert f'prints `lcnn-timm push: error: ...` with exit status {rc},' in docs
