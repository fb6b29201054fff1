"""Building blocks shared by the CIFAR-style model families.

A "conv-BN unit" is the reference code's ``ConvBNBlock``: a bias-free conv
followed by a non-affine BatchNorm. In the LCNN form the conv is normalised by
its operator norm (for the real input size it sees, known at construction) and
the BatchNorm is the gamma-Lipschitz one; the standard baselines use a plain
conv and a plain non-affine BatchNorm.
"""
from collections import OrderedDict
from functools import partial
from typing import Any, Callable, List, Optional, Set, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, get_act_layer, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, checkpoint_seq
from timm.models._features import feature_take_indices
from torch import nn

from ..curvature.penalty import add_penalty_to_backward, penalty_weights
from ..layers.spectral_norm import refresh_spectral_norms, scriptable_copy, spectral_norm
from ._pretrained import explain_pretrained_failure, filter_classifier, require_weights

__all__ = [
    "FLATTEN_POOL",
    "STANDARD_LAYERS",
    "CifarClassifier",
    "StemStagesClassifier",
    "ConvNormAct",
    "LayerFactory",
    "conv_output_size",
    "create_cifar_model",
    "create_head",
    "create_pool",
    "lcnn_no_weight_decay",
    "resolve_act_layer",
    "resolve_norm_layer",
    "spatial_size",
]

LayerFactory = Callable[..., nn.Module]

# Parameters that set the curvature bound (beta of centered softplus, gamma of gamma-BN):
# the reference trains them without weight decay; the curvature penalty regularises them instead.
_NO_WEIGHT_DECAY_NAMES = ("log_beta", "log_gamma")

# The reference "Standard" networks: ReLU-like but twice differentiable activation,
# non-affine BatchNorm, plain convs (the ResNets keep a spectrally normalised head).
STANDARD_LAYERS = dict(
    act_layer=partial(nn.Softplus, beta=1000.0),
    norm_layer=partial(nn.BatchNorm2d, affine=False),
    conv_spectral_norm=False,
)


def spatial_size(img_size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """``img_size`` as ``(H, W)``, validated."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"img_size must be a positive int or an (H, W) pair of positive ints, got {img_size!r}")
    return size


def conv_output_size(input_size: Tuple[int, int], kernel_size: int, stride: int) -> Tuple[int, int]:
    """Spatial output size of a conv with ``padding = kernel_size // 2``."""
    pad = kernel_size // 2
    return tuple((s + 2 * pad - kernel_size) // stride + 1 for s in input_size)


def resolve_act_layer(act_layer: Union[str, LayerFactory]) -> LayerFactory:
    """A timm activation name or a module factory, as a factory (called with no arguments)."""
    try:
        resolved = get_act_layer(act_layer)
    except KeyError:
        raise ValueError(f"unknown activation {act_layer!r}: pass a timm activation name or a module class") from None
    if resolved is None:
        raise ValueError("act_layer must name an activation; these models need one at every position")
    return resolved


def resolve_norm_layer(norm_layer: Union[str, LayerFactory]) -> LayerFactory:
    """A timm norm name or a module factory, as a factory called with the channel count."""
    try:
        resolved = get_norm_layer(norm_layer)
    except (KeyError, AssertionError):
        raise ValueError(f"unknown norm layer {norm_layer!r}: pass a timm norm name or a module class") from None
    if resolved is None:
        raise ValueError("norm_layer must name a normalisation layer")
    return resolved


class ConvNormAct(nn.Sequential):
    """Bias-free conv (``padding = kernel_size // 2``), norm and an optional activation.

    Args:
        in_chs, out_chs, kernel_size, stride: the conv.
        input_size: spatial (H, W) of the conv's input, for the operator spectral norm.
        norm_layer: called with ``out_chs``.
        act_layer: called with no arguments (one module per position), or None for no activation.
        spectral: normalise the conv by its operator norm. The power iteration is left
            to the model, which refreshes all norms once its weights are final.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        input_size: Tuple[int, int],
        norm_layer: LayerFactory,
        act_layer: Optional[LayerFactory] = None,
        spectral: bool = True,
    ):
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False)
        if spectral:
            spectral_norm(conv, input_size, init_iterations=0)
        layers = OrderedDict(conv=conv, bn=norm_layer(out_chs))
        if act_layer is not None:
            layers["act"] = act_layer()
        super().__init__(layers)
        self.output_size = conv_output_size(input_size, kernel_size, stride)


FLATTEN_POOL = "flatten"  # global_pool value: no pooling, the Linear head sees every position (the reference VGG)


def create_pool(pool_type: str) -> SelectAdaptivePool2d:
    """timm's global pool for ``pool_type``, plus ``'flatten'`` (flatten the whole map); ``''`` keeps the 4-D map."""
    if pool_type != FLATTEN_POOL:
        return SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
    pool = SelectAdaptivePool2d(pool_type="", flatten=True)
    pool.pool_type = FLATTEN_POOL  # timm records this string (config.json, model_args) to rebuild the head
    return pool


def create_head(
    num_features: int,
    feature_size: Tuple[int, int],
    num_classes: int,
    pool_type: str,
    spectral: bool,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[SelectAdaptivePool2d, nn.Module]:
    """Global pool and a Linear classifier.

    ``num_features`` channels of spatial size ``feature_size`` reach the head;
    with ``pool_type='flatten'`` the Linear sees all of them; ``pool_type=''`` (no
    pooling, timm's convention) leaves the 4-D map and so allows no classifier.
    With ``spectral`` the Linear is normalised by its spectral norm (converged now).
    """
    global_pool = create_pool(pool_type)
    if num_classes <= 0:
        return global_pool, nn.Identity()
    if not pool_type:
        raise ValueError(
            f"global_pool='' (no pooling) leaves a 4-D feature map, so it needs num_classes=0 (got {num_classes}); "
            f"global_pool='{FLATTEN_POOL}' puts the Linear head on the whole flattened map"
        )
    positions = feature_size[0] * feature_size[1] if pool_type == FLATTEN_POOL else global_pool.feat_mult()
    fc = nn.Linear(num_features * positions, num_classes, device=device, dtype=dtype)
    if spectral:
        spectral_norm(fc)
    return global_pool, fc


def lcnn_no_weight_decay(model: nn.Module) -> Set[str]:
    """Names of every ``log_beta`` / ``log_gamma`` parameter of ``model``."""
    return {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in _NO_WEIGHT_DECAY_NAMES}


def create_cifar_model(model_cls: type, variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the families' feature and checkpoint-filter settings.

    ``curvature_penalty=(beta_weight, gamma_weight)`` makes training-mode backward passes add the curvature
    penalty's gradient (:func:`lcnn_timm.curvature.add_penalty_to_backward`), so trainers that only compute the
    classification loss, such as timm's ``train.py``, train with the penalty. timm records it with the other
    ``create_model`` arguments, so a model re-created from an export trains with the same penalty.
    """
    penalty = kwargs.pop("curvature_penalty", None)
    if pretrained:
        require_weights(variant, kwargs)
    failure = None
    try:
        model = build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=filter_classifier,
            feature_cfg=dict(flatten_sequential=True),
            **kwargs,
        )
    except Exception as error:
        if not pretrained:
            raise
        failure = error
    if failure is not None:
        # outside the except block, so a HubError does not drag timm's traceback along as its context
        explain_pretrained_failure(variant, kwargs)
        raise failure
    if penalty is not None:
        add_penalty_to_backward(model, *penalty_weights(penalty))
    _record_input_size(model, kwargs.get("in_chans"), kwargs.get("img_size"))
    return model


def _record_input_size(model: nn.Module, in_chans: Optional[int], img_size: Any) -> None:
    """Make ``pretrained_cfg['input_size']`` the size the model was built for (timm's data pipeline and
    ``lcnn-timm evaluate`` read it): the spectrally normalised convs only hold their norm at that size."""
    channels, height, width = model.pretrained_cfg["input_size"]
    if img_size is not None:
        height, width = spatial_size(img_size)
    cfg = dict(model.pretrained_cfg, input_size=(in_chans or channels, height, width))
    if in_chans and in_chans != channels:  # one mean/std per channel: their average, repeated
        for key in ("mean", "std"):
            values = tuple(cfg[key])
            cfg[key] = (sum(values) / len(values),) * in_chans
    model.pretrained_cfg = model.default_cfg = cfg  # timm keeps both names


class CifarClassifier(nn.Module):
    """timm classifier interface shared by the families: head, classifier reset, checkpointing flags.

    Subclasses build their layers, then call :meth:`_init_head` with their final
    channel count and spatial size, and define ``forward_features`` and ``bound_chain``.
    """

    def _init_head(
        self, num_features: int, feature_size: Tuple[int, int], num_classes: int, global_pool: str, drop_rate: float,
        head_spectral_norm: bool,
    ) -> None:
        self.num_features = num_features
        self.feature_size = feature_size
        self.drop_rate = drop_rate
        self.head_spectral_norm = head_spectral_norm
        self.grad_checkpointing = False
        self.reset_classifier(num_classes, global_pool)
        # every weight is initialised now: converge all power iterations once
        refresh_spectral_norms(self)

    @torch.jit.ignore
    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles a copy with the normalised weights baked (parametrizations are not scriptable)."""
        return scriptable_copy(self)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The curvature parameters (log beta, log gamma): regularised by the curvature penalty instead."""
        return lcnn_no_weight_decay(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint per block. In training the recomputation runs one more power-iteration step per conv."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (spectrally normalised if the model's head is)."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.num_classes = num_classes
        self.global_pool, self.fc = create_head(
            self.num_features, self.feature_size, num_classes, global_pool, self.head_spectral_norm, **get_device_dtype(self)
        )
        positions = self.feature_size[0] * self.feature_size[1] if global_pool == FLATTEN_POOL else 1
        self.head_hidden_size = self.num_features * positions * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def head_bound_chain(self) -> List[Tuple[str, nn.Module]]:
        """The head's layers in forward order (dropout is the identity in eval)."""
        return [
            ("global_pool.pool", self.global_pool.pool),
            ("global_pool.flatten", self.global_pool.flatten),
            ("fc", self.fc),
        ]

    def _feature_blocks(self) -> List[nn.Module]:
        """The modules whose outputs are the ``feature_info`` taps, in forward order; all but a stem are stages."""
        stem = getattr(self, "stem", None)
        return ([stem] if stem is not None else []) + list(self.stages)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's feature API: the final features and the ``feature_info`` taps selected by ``indices``.

        ``indices``: last n taps if an int, those listed (negative from the end), all if None.
        ``norm`` is accepted for timm's interface; these models have no final norm.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW' for these convnets, got {output_fmt!r}")
        blocks = self._feature_blocks()
        first_stage = len(blocks) - len(self.stages)
        take_indices, max_index = feature_take_indices(len(blocks), indices)
        if stop_early:
            blocks = blocks[:max_index + 1]
        intermediates = []
        for index, block in enumerate(blocks):
            # checkpoint exactly what forward_features checkpoints (each stage's blocks, not the stem)
            checkpointed = self.grad_checkpointing and index >= first_stage and not torch.jit.is_scripting()
            x = checkpoint_seq(block, x) if checkpointed else block(x)
            if index in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages after the last tap ``indices`` needs (and the head); return the taps' absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        first_stage = len(self.feature_info) - len(self.stages)
        for index in range(max(max_index + 1 - first_stage, 0), len(self.stages)):
            self.stages[index] = nn.Sequential()  # empty, not removed: forward_features and checkpoint_seq still iterate
        prune_end = max_index < len(self.feature_info) - 1
        if prune_end:
            # the features now end at the last kept tap; the head was sized for the final ones, so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class StemStagesClassifier(CifarClassifier):
    """A :class:`CifarClassifier` whose features are ``stages(stem(x))`` (checkpointing per stage block)."""

    def bound_chain(self) -> List[Tuple[str, nn.Module]]:
        """Layers in forward order, for :func:`lcnn_timm.certify.certify` and :func:`lcnn_timm.curvature.curvature_proxy`."""
        return [("stem", self.stem), ("stages", self.stages), *self.head_bound_chain()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x, flatten=True)
        return self.stages(x)
