"""The model registry: the seed's AlexNet counts, other torchvision classifiers, conv order."""
import pytest
import torch
from ptflops import get_model_complexity_info

from lrx.errors import UserError
from lrx.models import build_model, conv_layers


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
