"""Model registry: the seed's AlexNet for CIFAR-10 and a few torchvision classifiers.

Nothing else in lrx assumes AlexNet's structure; layers are found by walking ``nn.Conv2d`` modules.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torchvision

from .errors import UserError


def alexnet_cifar10(num_classes: int = 10) -> nn.Module:
    """torchvision's AlexNet features + avgpool with the seed's smaller classifier.

    Classifier: Dropout, Linear(9216, 4096), ReLU, Dropout, Linear(4096, 1024), ReLU,
    Linear(1024, num_classes). At 3x224x224: 44.43M params, 698.9M MACs (ptflops).
    """
    model = torchvision.models.alexnet(weights=None)
    model.classifier = nn.Sequential(
        nn.Dropout(p=0.5),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(p=0.5),
        nn.Linear(4096, 1024),
        nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )
    return model


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    """Four 3x3 convs and a linear head: fast enough for tests and CPU tutorials."""
    def block(c_in, c_out, pool):
        layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        return layers + [nn.MaxPool2d(2)] if pool else layers

    return nn.Sequential(
        *block(3, 16, True), *block(16, 32, True), *block(32, 32, False), *block(32, 32, True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32 * 4, num_classes),
    )


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int = 10) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    build.__doc__ = f"torchvision's {name}, from scratch, with ``num_classes`` outputs."
    return build


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "alexnet_cifar10": alexnet_cifar10,
    "tiny_cnn": tiny_cnn,
    **{name: _torchvision(name) for name in ("vgg11", "vgg16", "resnet18", "resnet50", "mobilenet_v2")},
}

# The ImageNet weights whose convolutional features ``init: imagenet`` copies.
IMAGENET_WEIGHTS = {
    "alexnet_cifar10": ("alexnet", "AlexNet_Weights.IMAGENET1K_V1"),
    "vgg11": ("vgg11", "VGG11_Weights.IMAGENET1K_V1"),
    "vgg16": ("vgg16", "VGG16_Weights.IMAGENET1K_V1"),
    "resnet18": ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": ("resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1"),
}

# The smallest square input each model accepts (AlexNet: conv1 stride 4 and three 3x3/2 max-pools).
MIN_IMAGE_SIZE = {"alexnet_cifar10": 63, "tiny_cnn": 8, "vgg11": 32, "vgg16": 32, "resnet18": 32, "resnet50": 32, "mobilenet_v2": 32}


def build_model(name: str, num_classes: int = 10, init: str = "scratch") -> nn.Module:
    """Return a fresh model by its registry name.

    ``init="imagenet"`` copies the convolutional layers of torchvision's ImageNet weights
    (downloaded on first use); the classifier stays freshly initialised.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}", key="model.name")
    if init not in ("scratch", "imagenet"):
        raise UserError(f"unknown init {init!r}; allowed: scratch, imagenet", key="model.init")
    model = MODELS[name](num_classes)
    if init == "imagenet":
        if name not in IMAGENET_WEIGHTS:
            raise UserError(f"no ImageNet weights for {name}; allowed: {', '.join(IMAGENET_WEIGHTS)}", key="model.init")
        _load_imagenet_features(name, model)
    return model


def _load_imagenet_features(name: str, model: nn.Module) -> None:
    arch, weights_name = IMAGENET_WEIGHTS[name]
    try:
        weights = torchvision.models.get_weight(weights_name)
        state = weights.get_state_dict(progress=False)
    except Exception as err:  # network or cache failure: the user must fetch the file
        raise UserError(
            f"cannot download ImageNet weights {weights_name} for {arch} ({type(err).__name__}: {err}); "
            f"put the file in {torch.hub.get_dir()}/checkpoints or use init: scratch",
            key="model.init",
        ) from None
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(("classifier", "fc"))}
    model.load_state_dict(shared, strict=False)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's ``nn.Conv2d`` modules in module order, as (qualified name, module).

    The seed's "layers 2,3,4,5" are 1-based positions in this list.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def min_image_size(name: str) -> int:
    """The smallest square image size the named model accepts."""
    return MIN_IMAGE_SIZE.get(name, 32)
