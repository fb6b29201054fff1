"""Pretrained-config helpers shared by the model families: datasets, labels, provenance.

Only tags whose weights have been trained and staged as a Hub repository
(``hub_cards/<arch>.<tag>/``) carry a weight location (``hf_hub_id``, under
:data:`HUB_ORG`); every other tag has none, so ``pretrained=True`` raises timm's
own "No pretrained weights exist" error instead of silently returning a random model.

Input normalisation: the reference code trains on raw pixels in [0, 1] with no
mean/std normalisation, and the paper's attack radii and curvatures are in that
pixel scale. The cfgs therefore carry ``mean=0, std=1`` (timm's transforms then
leave [0, 1] pixels unchanged); the datasets' own statistics are in ``notes``.
"""
from typing import Any, Dict

import torch
from torch import nn

__all__ = [
    "CIFAR100_LABEL_NAMES",
    "FASHION_MNIST_LABEL_NAMES",
    "HUB_ORG",
    "fashion_mnist_zoo_cfgs",
    "cifar100_cfg",
    "fashion_mnist_cfg",
    "filter_classifier",
    "lcnn_cfgs",
    "standard_cfgs",
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


def cifar100_cfg(**kwargs: Any) -> Dict[str, Any]:
    """CIFAR-100: 3x32x32 inputs in [0, 1], 100 fine labels."""
    return _cfg(
        input_size=(3, 32, 32),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=100,
        label_names=CIFAR100_LABEL_NAMES,
        notes=("inputs are raw [0, 1] pixels as in the paper; CIFAR-100 train statistics are "
               "mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)",),
        **kwargs,
    )


def fashion_mnist_cfg(**kwargs: Any) -> Dict[str, Any]:
    """Fashion-MNIST: 1x28x28 inputs in [0, 1], 10 classes."""
    return _cfg(
        input_size=(1, 28, 28),
        mean=(0.0,),
        std=(1.0,),
        num_classes=10,
        label_names=FASHION_MNIST_LABEL_NAMES,
        notes=("inputs are raw [0, 1] pixels; Fashion-MNIST train statistics are mean=(0.2860,), std=(0.3530,)",),
        **kwargs,
    )


def filter_classifier(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Drop the whole classifier when timm adapts the head (``num_classes`` differs from the cfg's).

    timm drops only ``fc.weight``/``fc.bias``; a spectrally normalised head is
    stored as ``fc.parametrizations.weight.original`` plus its singular vectors,
    which must go with the bias. Shapes that differ also drop the head.
    """
    prefix = model.get_classifier(name_only=True) + "."
    own = model.state_dict()
    head_keys = [k for k in state_dict if k.startswith(prefix)]
    new_classes = model.num_classes != getattr(model, "pretrained_cfg", {}).get("num_classes", model.num_classes)
    if new_classes or any(k not in own or own[k].shape != state_dict[k].shape for k in head_keys):
        return {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    return state_dict


def lcnn_cfgs(architecture: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Tags of an LCNN architecture: curvature penalty alone and with GradReg, CIFAR-100 and Fashion-MNIST."""
    return {
        f"{architecture}.cifar100": cifar100_cfg(description="LCNN (curvature penalty)", **kwargs),
        f"{architecture}.cifar100_gradreg": cifar100_cfg(description="LCNN + GradReg", **kwargs),
        f"{architecture}.fmnist": fashion_mnist_cfg(description="LCNN (curvature penalty)", **kwargs),
        f"{architecture}.fmnist_gradreg": fashion_mnist_cfg(description="LCNN + GradReg", **kwargs),
    }


def standard_cfgs(architecture: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Tags of a "Standard" baseline architecture (plain cross-entropy)."""
    description = "Standard baseline (softplus beta=1000)"
    return {
        f"{architecture}.cifar100": cifar100_cfg(description=description, **kwargs),
        f"{architecture}.fmnist": fashion_mnist_cfg(description=description, **kwargs),
    }


def fashion_mnist_zoo_cfgs(architecture: str, lcnn: bool) -> Dict[str, Dict[str, Any]]:
    """Fashion-MNIST tags of a zoo architecture; the LCNN ones point at their Hub repositories."""
    if not lcnn:
        return {f"{architecture}.fmnist": fashion_mnist_cfg(description="Standard baseline (softplus beta=1000)")}
    return {
        f"{architecture}.{tag}": fashion_mnist_cfg(description=description, hf_hub_id=f"{HUB_ORG}/{architecture}.{tag}")
        for tag, description in (("fmnist", "LCNN (curvature penalty)"), ("fmnist_gradreg", "LCNN + GradReg"))
    }
