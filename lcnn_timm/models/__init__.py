"""LCNN and baseline models in timm's registry (``import lcnn_timm`` registers them).

* ``lcnn_resnet18``, ``lcnn_resnet34``, ``lcnn_vgg11``: low-curvature networks in the paper's CIFAR form.
* ``lcnn_lipcnn``: a 1-Lipschitz LCNN built to be certified (Softplus MaxMin activations).
* ``cifar_resnet18``, ``cifar_resnet34``, ``cifar_vgg11``: the reference's "Standard" baselines.
"""
from .cifar_resnet import CifarResNet
from .cifar_vgg import CifarVgg
from .lipschitz_cnn import LipschitzCnn
