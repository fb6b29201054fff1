"""Data for LCNN training and evaluation: small-image datasets as uint8 tensors, batched tensor augmentation."""
from .cifar import CIFAR_HUB_IDS, load_cifar
from .datasets import ImageTensorDataset, is_tensor_dataset, load_eval_dataset, load_image_tensors, resolve_dataset_name
from .fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist, read_idx
from .gpu_augment import random_crop_flip, to_float
from .tensor_loader import TensorLoader
