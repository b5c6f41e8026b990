"""The model registry: the seed's AlexNet counts, other torchvision classifiers, conv order; torchvision: and
python: models."""
import sys

import pytest
import torch
from ptflops import get_model_complexity_info

from lrx.base.errors import UserError
from lrx.nn.models import build_model, conv_layers


def test_alexnet_cifar10_matches_seed_row_1():
    model = build_model("alexnet_cifar10")
    macs, params = get_model_complexity_info(model, (3, 224, 224), as_strings=False, print_per_layer_stat=False)
    assert abs(params - 44.43e6) / 44.43e6 < 0.003, f"params {params}"
    assert abs(macs - 698.9e6) / 698.9e6 < 0.003, f"MACs {macs}"
    assert [m.kernel_size for _, m in conv_layers(model)] == [(11, 11), (5, 5), (3, 3), (3, 3), (3, 3)]


@pytest.mark.parametrize("name", ["vgg11", "resnet18", "tiny_cnn"])
def test_other_classifiers_build_with_num_classes(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 7), f"{name} has 7 outputs"
    assert len(conv_layers(model)) >= 4


def test_unknown_model_and_init_are_user_errors():
    with pytest.raises(UserError, match="allowed: alexnet_cifar10"):
        build_model("alexnet2")
    with pytest.raises(UserError, match="allowed: scratch, imagenet"):
        build_model("tiny_cnn", init="random")


def test_imagenet_init_without_network_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="cannot download ImageNet weights"):
        build_model("alexnet_cifar10", init="imagenet")


def test_torchvision_registry_models_build_with_num_classes():
    model = build_model("torchvision:squeezenet1_1", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(UserError, match="torchvision has no classification model 'resnet19'; e.g. resnet"):
        build_model("torchvision:resnet19")
    with pytest.raises(UserError, match="has no weights 'IMAGENET9K'; allowed: IMAGENET1K_V1"):
        build_model("torchvision:resnet18", weights="IMAGENET9K")
    with pytest.raises(UserError, match="init 'imagenet' is for registry models"):
        build_model("torchvision:resnet18", init="imagenet")


def test_python_factories_are_imported_from_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    name = f"own_factory_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        "import torch.nn as nn\n"
        "def with_classes(num_classes):\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))\n"
        "def without():\n    return nn.Sequential(nn.Conv2d(3, 4, 3))\n"
        "def not_a_model(num_classes):\n    return 42\n"
        "VALUE = 3\n")
    try:
        model = build_model(f"python:{name}:with_classes", num_classes=6)
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 6), "factory(num_classes=6)"
        assert len(conv_layers(build_model(f"python:{name}:without"))) == 1, "factory() when it takes no num_classes"
        with pytest.raises(UserError, match="returned int, not a torch.nn.Module"):
            build_model(f"python:{name}:not_a_model")
        with pytest.raises(UserError, match="has no callable 'VALUE'; its own callables: with_classes, without"):
            build_model(f"python:{name}:VALUE")
        with pytest.raises(UserError, match="no module 'no_such_module_xyz' on sys.path, in the current directory"):
            build_model("python:no_such_module_xyz:build")
    finally:
        sys.modules.pop(name, None)
