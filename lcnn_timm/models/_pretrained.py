"""Pretrained-config helpers shared by the model families: datasets, labels, provenance, weight locations.

Only tags whose weights have been trained and staged as a Hub repository
(``hub_cards/<arch>.<tag>/``) carry a weight location: the copy shipped in the
package (``lcnn_timm/pretrained/<arch>.<tag>.safetensors``, timm's ``file=``, loaded
offline) when it is installed, and the Hub repository (``hf_hub_id``, under
:data:`HUB_ORG`), which timm uses when there is no file. Every other tag has none:
``pretrained=True`` raises a "No pretrained weights exist" error that says how to
produce them, instead of silently returning a random model.

Input normalisation: the reference code trains on raw pixels in [0, 1] with no
mean/std normalisation, and the paper's attack radii and curvatures are in that
pixel scale. The cfgs therefore carry ``mean=0, std=1`` (timm's transforms then
leave [0, 1] pixels unchanged); the datasets' own statistics are in ``notes``.
"""
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from huggingface_hub import try_to_load_from_cache
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from torch import nn

from ..hub.push import WEIGHTS_NAME, check_state_dict, read_weights
from ..layers.spectral_norm import canonical_weight_keys

__all__ = [
    "CIFAR100_LABEL_NAMES",
    "FASHION_MNIST_LABEL_NAMES",
    "HUB_ORG",
    "PRETRAINED_DIR",
    "fashion_mnist_zoo_cfgs",
    "cifar100_cfg",
    "fashion_mnist_cfg",
    "filter_classifier",
    "lcnn_cfgs",
    "require_weights",
    "explain_pretrained_failure",
    "shipped_weights",
    "standard_cfgs",
    "weight_location",
]

CIFAR100_LABEL_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fine labels, in the dataset's index order (alphabetical)

FASHION_MNIST_LABEL_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

HUB_ORG = "lcnn-timm"  # the Hub organisation the zoo is published under (repo name = "<arch>.<tag>")

# package data: <arch>.<tag>.safetensors, each a link to (in a built wheel, a copy of) hub_cards/<arch>.<tag>/model.safetensors
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"

# the zoo rows `lcnn-timm reproduce` trains and stages as hub_cards/<arch>.<tag>/ (configs/<zoo>_lcnn*.yaml)
_REPRODUCED = {
    "lcnn_resnet18.cifar100": "cifar100", "lcnn_resnet18.cifar100_gradreg": "cifar100",
    "lcnn_resnet18_025.fmnist": "fashion_mnist", "lcnn_resnet18_025.fmnist_gradreg": "fashion_mnist",
}

FeatureSize = Callable[[Tuple[int, int]], Tuple[int, int]]

_PROVENANCE = dict(
    license="apache-2.0",
    paper_name="Efficient Training of Low-Curvature Neural Networks",
    paper_ids="arXiv:2206.07144",
    origin_url="https://github.com/kylematoba/lcnn",
)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    defaults = dict(
        crop_pct=1.0,
        interpolation="bilinear",
        # the operator spectral norms are computed for this input size
        fixed_input_size=True,
        first_conv="stem.conv",
        classifier="fc",
        **_PROVENANCE,
    )
    return {**defaults, **kwargs}


def cifar100_cfg(feature_size: FeatureSize, **kwargs: Any) -> Dict[str, Any]:
    """CIFAR-100: 3x32x32 inputs in [0, 1], 100 fine labels; ``feature_size`` maps (H, W) to the final map's."""
    return _cfg(
        input_size=(3, 32, 32),
        pool_size=feature_size((32, 32)),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=100,
        label_names=CIFAR100_LABEL_NAMES,
        notes=("inputs are raw [0, 1] pixels as in the paper; CIFAR-100 train statistics are "
               "mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)",),
        **kwargs,
    )


def fashion_mnist_cfg(feature_size: FeatureSize, **kwargs: Any) -> Dict[str, Any]:
    """Fashion-MNIST: 1x28x28 inputs in [0, 1], 10 classes; ``feature_size`` maps (H, W) to the final map's."""
    return _cfg(
        input_size=(1, 28, 28),
        pool_size=feature_size((28, 28)),
        mean=(0.0,),
        std=(1.0,),
        num_classes=10,
        label_names=FASHION_MNIST_LABEL_NAMES,
        notes=("inputs are raw [0, 1] pixels; Fashion-MNIST train statistics are mean=(0.2860,), std=(0.3530,)",),
        **kwargs,
    )


def lcnn_cfgs(architecture: str, feature_size: FeatureSize, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Tags of an LCNN architecture: curvature penalty alone and with GradReg, CIFAR-100 and Fashion-MNIST."""
    return {
        f"{architecture}.cifar100": cifar100_cfg(feature_size, description="LCNN (curvature penalty)", **kwargs),
        f"{architecture}.cifar100_gradreg": cifar100_cfg(feature_size, description="LCNN + GradReg", **kwargs),
        f"{architecture}.fmnist": fashion_mnist_cfg(feature_size, description="LCNN (curvature penalty)", **kwargs),
        f"{architecture}.fmnist_gradreg": fashion_mnist_cfg(feature_size, description="LCNN + GradReg", **kwargs),
    }


def standard_cfgs(architecture: str, feature_size: FeatureSize, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Tags of a "Standard" baseline architecture (plain cross-entropy)."""
    description = "Standard baseline (softplus beta=1000)"
    return {
        f"{architecture}.cifar100": cifar100_cfg(feature_size, description=description, **kwargs),
        f"{architecture}.fmnist": fashion_mnist_cfg(feature_size, description=description, **kwargs),
    }


def shipped_weights(name: str) -> Optional[Path]:
    """The weights of ``arch.tag`` shipped in the package, or None."""
    path = PRETRAINED_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def fashion_mnist_zoo_cfgs(architecture: str, lcnn: bool, feature_size: FeatureSize) -> Dict[str, Dict[str, Any]]:
    """Fashion-MNIST tags of a zoo architecture; the LCNN ones point at their shipped file and Hub repository."""
    if not lcnn:
        return {f"{architecture}.fmnist": fashion_mnist_cfg(
            feature_size, description="Standard baseline (softplus beta=1000)")}
    cfgs = {}
    for tag, description in (("fmnist", "LCNN (curvature penalty)"), ("fmnist_gradreg", "LCNN + GradReg")):
        name = f"{architecture}.{tag}"
        cfgs[name] = fashion_mnist_cfg(feature_size, description=description, **weight_location(name))
    return cfgs


def weight_location(name: str) -> Dict[str, str]:
    """The weight locations of a staged ``arch.tag``: its Hub repository, and the shipped file when installed."""
    location = dict(hf_hub_id=f"{HUB_ORG}/{name}")
    shipped = shipped_weights(name)
    if shipped is not None:
        location["file"] = str(shipped)  # timm prefers file= to hf_hub_id
    return location


def _cfg_name(cfg: Dict[str, Any]) -> str:
    return f"{cfg.get('architecture')}.{cfg['tag']}" if cfg.get("tag") else str(cfg.get("architecture"))


def _requested_cfg(variant: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The pretrained cfg ``create_model(variant, **kwargs)`` resolves (tag, ``pretrained_cfg_overlay``)."""
    return resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    ).to_dict()


def require_weights(variant: str, kwargs: Dict[str, Any]) -> None:
    """Raise a RuntimeError saying how to produce the weights when the requested pretrained cfg has none."""
    cfg = _requested_cfg(variant, kwargs)
    if _resolve_pretrained_source(cfg)[0]:
        return
    name = _cfg_name(cfg)
    zoo = _REPRODUCED.get(name)
    produce = (f"`lcnn-timm reproduce --zoo {zoo}` trains them and stages hub_cards/{name}/" if zoo else
               f"No zoo config trains {variant}: train one with `lcnn-timm train`")
    raise RuntimeError(
        f"No pretrained weights exist for {name}: none are shipped or published. {produce}; then load the weights "
        f"with pretrained_cfg_overlay=dict(file='PATH/{WEIGHTS_NAME}') or lcnn_timm.hub.load_pretrained('local-dir:DIR')."
    )


def _weights_file(cfg: Dict[str, Any]) -> Optional[Path]:
    """The local file timm read (or tried to read) ``cfg``'s weights from; None if not on this machine."""
    kind, location = _resolve_pretrained_source(cfg)  # timm's own resolution: file, then Hub
    if kind == "file":
        return Path(location)
    if kind == "local-dir":
        return Path(location) / WEIGHTS_NAME
    if kind == "hf-hub":
        repo_id, filename = location if isinstance(location, (tuple, list)) else (location, WEIGHTS_NAME)
        repo_id, _, revision = repo_id.partition("@")
        cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)  # never downloads
        return Path(cached) if isinstance(cached, str) else None
    return None


def explain_pretrained_failure(variant: str, kwargs: Dict[str, Any]) -> None:
    """After timm failed to load pretrained weights: raise HubError if the weights file is missing or unreadable."""
    path = _weights_file(_requested_cfg(variant, kwargs))
    if path is not None:
        read_weights(path)


def filter_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's checkpoint filter: drop the whole classifier when timm adapts the head, then check the rest fits.

    timm drops only ``fc.weight``/``fc.bias``; a spectrally normalised head also
    stores its singular vectors (``fc.parametrizations.weight.0._u``/``_v``, shaped
    by the old head), which must go with them. Shapes that differ also drop the head. Anything
    else that does not fit ``model`` (weights of another architecture, other
    ``in_chans`` or ``img_size``) raises :class:`lcnn_timm.hub.HubError` naming the tensors.
    """
    prefix = model.get_classifier(name_only=True) + "."
    own = canonical_weight_keys(model.state_dict())
    head = {k: v for k, v in canonical_weight_keys(state_dict).items() if k.startswith(prefix)}
    cfg = getattr(model, "pretrained_cfg", {})
    new_classes = model.num_classes != cfg.get("num_classes", model.num_classes)
    if new_classes or any(k not in own or own[k].shape != v.shape for k, v in head.items()):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        ignore = (prefix,)  # the model's new head keeps its initialisation
    else:
        ignore = ()
    kind, location = _resolve_pretrained_source(cfg)
    check_state_dict(model, state_dict, f"Pretrained weights of {_cfg_name(cfg)} ({kind} {location})",
                     ignore_missing=ignore)
    return state_dict
