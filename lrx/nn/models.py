"""Models by name, and the weights they start from.

``model.name`` is one of three forms:

- a registry name (:data:`MODELS`): the seed's AlexNet for CIFAR-10, ``tiny_cnn`` and a few torchvision
  classifiers;
- ``torchvision:<name>``: any classification model of torchvision's registry
  (``torchvision.models.list_models``), with ``num_classes`` outputs and optionally ``weights``;
- ``python:<package.module>:<factory>``: the user's own code, imported and called (it runs whatever the
  module runs, as any Python entry point does); ``factory(num_classes=N)`` (or ``factory()`` when it takes
  no ``num_classes``) returns an ``nn.Module``. The module is looked up on ``sys.path``, in the current
  directory and in the folder of the config that names it.

:func:`initial_model` adds the starting weights: ImageNet features (``init: imagenet``), torchvision's
``weights``, or the user's ``checkpoint`` (a state_dict or an lrx model file, loaded with
``weights_only=True``). Nothing else in lrx assumes a model's structure; layers are found by walking
``nn.Conv2d`` modules.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn
import torchvision

from lrx.config.settings import ModelConfig
from lrx.base.errors import UserError
from lrx.base.files import not_a_file

__all__ = ["alexnet_cifar10", "tiny_cnn", "MODELS", "IMAGENET_WEIGHTS", "MIN_IMAGE_SIZE", "TORCHVISION", "PYTHON",
           "build_model", "torchvision_models", "initial_model", "check_start", "load_user_weights", "conv_layers",
           "min_image_size"]


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


TORCHVISION = "torchvision:"
PYTHON = "python:"


def build_model(name: str, num_classes: int = 10, init: str = "scratch", weights: str | None = None) -> nn.Module:
    """Return a fresh model by name (a registry name, ``torchvision:<name>`` or ``python:<module>:<factory>``).

    ``init="imagenet"`` copies the convolutional layers of torchvision's ImageNet weights
    (downloaded on first use); the classifier stays freshly initialised. ``weights`` (torchvision:
    models only) names torchvision's pretrained weights (``DEFAULT``, ``IMAGENET1K_V1``, ...); with
    another number of classes than the weights', every tensor but the classifier's is copied.
    """
    if init != "scratch" and name.startswith((TORCHVISION, PYTHON)):
        raise UserError(f"init {init!r} is for registry models; {name} starts from scratch, model.weights "
                        "(torchvision: models) or model.checkpoint", key="model.init")
    if name.startswith(TORCHVISION):
        return _torchvision_model(name[len(TORCHVISION):], num_classes, weights)
    if weights is not None:
        raise UserError(f"weights {weights!r} go with a torchvision:<name> model, not {name!r}", key="model.weights")
    if name.startswith(PYTHON):
        return _python_model(name[len(PYTHON):], num_classes)
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}, torchvision:<name> "
                        "(torchvision.models.list_models()), python:<package.module>:<factory>", key="model.name")
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
    state = _download(torchvision.models.get_weight(weights_name), arch, "model.init", "use init: scratch")
    own = model.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and not k.startswith(("classifier", "fc"))}
    model.load_state_dict(shared, strict=False)


def _download(weights, arch: str, key: str, instead: str) -> dict:
    """The state dict of torchvision ``weights`` (downloaded on first use into torch's hub folder)."""
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # network or cache failure: the user must fetch the file
        raise UserError(
            f"cannot download ImageNet weights {weights} for {arch} ({type(err).__name__}: {err}); "
            f"put the file in {torch.hub.get_dir()}/checkpoints or {instead}", key=key) from None


def torchvision_models() -> list[str]:
    """torchvision's classification models (``torchvision.models.list_models(module=torchvision.models)``)."""
    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_model(name: str, num_classes: int, weights: str | None) -> nn.Module:
    known = torchvision_models()
    if name not in known:
        close = [n for n in known if n.startswith(name[:4])][:8] or known[:8]
        raise UserError(f"torchvision has no classification model {name!r}; e.g. {', '.join(close)} "
                        "(all: torchvision.models.list_models())", key="model.name")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    options, member = _weights_member(name, weights)
    state = _download(options[member], name, "model.weights", "set model.weights: null")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)
    return model


def _weights_member(name: str, weights: str):
    """(torchvision's weights enum of model ``name``, the member ``weights`` names), checked without a download."""
    options = torchvision.models.get_model_weights(name)
    member = weights.split(".")[-1]  # "ResNet18_Weights.IMAGENET1K_V1" or "IMAGENET1K_V1"
    if member not in options.__members__:
        raise UserError(f"{name} has no weights {weights!r}; allowed: {', '.join(options.__members__)}",
                        key="model.weights")
    return options, member


@contextlib.contextmanager
def _with_cwd_on_path():
    """The current directory on ``sys.path`` while importing (the ``lrx`` script does not put it there)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _python_model(spec: str, num_classes: int) -> nn.Module:
    """``factory(num_classes=N)`` (or ``factory()``) of ``package.module:factory``: the user's code runs here."""
    module_name, _, attr = spec.rpartition(":")
    key = "model.name"
    try:
        with _with_cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise UserError(f"python:{spec}: no module {module_name!r} on sys.path, in the current directory or "
                            "in the config's folder", key=key) from None
        raise UserError(f"python:{spec}: importing {module_name} failed: {err}", key=key) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__][:10]
        raise UserError(f"python:{spec}: module {module_name} ({getattr(module, '__file__', '?')}) has no callable "
                        f"{attr!r}; its own callables: {', '.join(found) or 'none'}", key=key)
    try:
        params = inspect.signature(factory).parameters
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # a builtin without a signature
        takes = True
    model = factory(num_classes=num_classes) if takes else factory()
    if not isinstance(model, nn.Module):
        raise UserError(f"python:{spec} returned {type(model).__name__}, not a torch.nn.Module", key=key)
    return model


# ---------------------------------------------------------------- starting weights


def initial_model(settings: ModelConfig) -> nn.Module:
    """The model a baseline run starts from: built by name, with ``init``/``weights``, then the user's
    ``checkpoint`` when given (relative paths from the current directory, as ``data.root``)."""
    model = build_model(settings.name, settings.num_classes, settings.init, settings.weights)
    if settings.checkpoint is not None:
        load_user_weights(model, settings.checkpoint)
    return model


def check_start(settings: ModelConfig, model: nn.Module) -> None:
    """What :func:`initial_model` would refuse, found before anything runs and without a download: a
    ``weights`` name the model does not have, a ``checkpoint`` that is missing or does not fit ``model``
    (a freshly built model of the config; its weights are overwritten)."""
    if settings.weights is not None and settings.name.startswith(TORCHVISION):
        _weights_member(settings.name[len(TORCHVISION):], settings.weights)
    if settings.checkpoint is not None:
        load_user_weights(model, settings.checkpoint)


def load_user_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the user's trained weights into ``model``: a state_dict (optionally under ``"state_dict"`` or
    ``"model"``, as in an lrx model file; a DistributedDataParallel ``module.`` prefix is dropped), read with
    ``torch.load(weights_only=True)``. Every tensor must match: missing, unexpected and mis-shaped keys are
    refused by name (:class:`UserError`, key ``model.checkpoint``)."""
    path = Path(path)
    key = "model.checkpoint"
    problem = not_a_file(path)
    if problem is not None:
        where = f" (relative paths start from the current directory {os.getcwd()})" if problem == "no such file" else ""
        raise UserError(f"{str(path)!r}: {problem}{where}; give a file of trained weights", key=key)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds Python objects other than tensors (a whole pickled model?); lrx loads "
                        "weights only: save torch.save(model.state_dict(), PATH) instead", key=key) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise UserError(f"cannot read {path}: {' '.join(str(err).split())[:200]}", key=key) from None
    state = _state_dict_of(blob, path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = [f"{label} {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''} ({len(keys)})"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
    if problems:
        raise UserError(f"{path} does not fit the model: {'; '.join(problems)}; check model.name and "
                        "model.num_classes", key=key)
    model.load_state_dict(state)


def _state_dict_of(blob, path: Path) -> dict:
    if isinstance(blob, dict) and isinstance(blob.get("spec"), dict):
        raise UserError(f"{path} is an lrx model file of an expanded model; model.checkpoint takes the original "
                        "(uncompressed) model's weights", key="model.checkpoint")
    for name in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(name), dict):
            blob = blob[name]
            break
    if (not isinstance(blob, dict) or not blob
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items())):
        raise UserError(f"{path} is not a state_dict (a mapping of names to tensors, or one under 'state_dict' "
                        "or 'model')", key="model.checkpoint")
    if all(k.startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The model's ``nn.Conv2d`` modules in module order, as (qualified name, module).

    The seed's "layers 2,3,4,5" are 1-based positions in this list.
    """
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def min_image_size(name: str) -> int:
    """The smallest square image size the named model accepts (1 for the user's python: models: unknown,
    the forward pass at the profile's input tells)."""
    if name.startswith(PYTHON):
        return 1
    return MIN_IMAGE_SIZE.get(name.removeprefix(TORCHVISION), 32)
