"""Transposed convolution (d2l 13.10), bilinear upsampling init, the FCN (13.11) and backbone weight specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from cvtasks.errors import DataFormatError
from cvtasks.models.fcn import FCN, UPSAMPLE_KERNEL, bilinear_kernel, build_fcn
from cvtasks.models.weights import (
    imagenet_cache_file,
    load_resnet18_backbone_weights,
    load_state_dict_file,
    resolve_state_dict,
)

BOOK_X = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)
BOOK_K = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).reshape(1, 1, 2, 2)


def book_tconv(**kwargs) -> nn.ConvTranspose2d:
    tconv = nn.ConvTranspose2d(1, 1, kernel_size=2, bias=False, **kwargs)
    tconv.weight.data = BOOK_K.clone()
    return tconv


def test_transposed_conv_matches_the_book():
    assert book_tconv()(BOOK_X).tolist() == [[[[0, 0, 1], [0, 4, 6], [4, 12, 9]]]]


def test_transposed_conv_padding_removes_the_outer_ring():
    assert book_tconv(padding=1)(BOOK_X).tolist() == [[[[4.0]]]]


def test_transposed_conv_stride_two_matches_the_book():
    assert book_tconv(stride=2)(BOOK_X).tolist() == [[[[0, 0, 0, 1], [0, 0, 2, 3], [0, 2, 0, 3], [4, 6, 6, 9]]]]


@pytest.mark.parametrize("stride", [2, 32])
def test_bilinear_kernel_upsamples_like_bilinear_interpolation_away_from_borders(stride):
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    tconv = nn.ConvTranspose2d(3, 3, kernel_size=2 * stride, stride=stride, padding=stride // 2, bias=False)
    tconv.weight.data.copy_(bilinear_kernel(3, 3, 2 * stride))
    ours = tconv(x)
    reference = F.interpolate(x, scale_factor=stride, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (1, 3, 6 * stride, 6 * stride)
    inner = slice(stride // 2, -(stride // 2))
    torch.testing.assert_close(ours[..., inner, inner], reference[..., inner, inner])


def test_bilinear_kernel_values_and_channel_layout():
    weight = bilinear_kernel(2, 3, 4)
    assert weight.shape == (2, 3, 4, 4)
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(weight[1, 1], taps[:, None] * taps[None, :])
    assert weight[0, 1].abs().sum() == 0 and weight[:, 2].abs().sum() == 0


@pytest.mark.parametrize("size", [(96, 128), (100, 75), (64, 64), (33, 31)])
def test_fcn_scores_have_the_input_size(size):
    model = FCN(num_classes=21).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 3, *size))
    assert out.shape == (2, 21, *size)


def test_fcn_upsampling_starts_bilinear():
    model = FCN(num_classes=5)
    torch.testing.assert_close(model.upsample.weight.data, bilinear_kernel(5, 5, UPSAMPLE_KERNEL))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_scratch_has_no_state_dict():
    state_dict, description = resolve_state_dict("scratch", ResNet18_Weights)
    assert state_dict is None and "scratch" in description


def test_imagenet_without_cache_names_the_expected_file(empty_hub):
    expected = empty_hub / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_cache_file(ResNet18_Weights.IMAGENET1K_V1) == expected
    with pytest.raises(FileNotFoundError, match=str(expected)):
        build_fcn(21, "imagenet")


def test_imagenet_loads_from_the_hub_cache(empty_hub):
    source = resnet18(weights=None)
    cache = imagenet_cache_file(ResNet18_Weights.IMAGENET1K_V1)
    cache.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cache)
    model = build_fcn(21, "imagenet")
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert "IMAGENET1K_V1" in model.weights_description


def test_backbone_from_a_state_dict_file(tmp_path):
    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    model = build_fcn(21, str(tmp_path / "sd.pt"))
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight)
    torch.testing.assert_close(model.backbone.layer2[0].bn1.running_mean, source.layer2[0].bn1.running_mean)
    assert model.weights_description.endswith("(backbone)")


def test_whole_fcn_state_dict_loads_in_full(tmp_path):
    trained = FCN(num_classes=21)
    with torch.no_grad():
        trained.classifier.bias.fill_(0.5)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    model = build_fcn(21, str(tmp_path / "checkpoint.pt"))
    torch.testing.assert_close(model.classifier.bias, trained.classifier.bias)
    assert model.weights_description.endswith("(whole FCN)")


def test_hotdog_style_resnet_keeps_its_own_head(tmp_path):
    source = resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    model = resnet18(weights=None, num_classes=2)
    head = model.fc.weight.clone()
    description = load_resnet18_backbone_weights(str(tmp_path / "sd.pt"), model)
    torch.testing.assert_close(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(model.fc.weight, head)
    assert str(tmp_path / "sd.pt") in description


def test_bad_weight_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="neither scratch, imagenet nor an existing file"):
        build_fcn(21, str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DataFormatError, match="junk.pt"):
        load_state_dict_file(str(tmp_path / "junk.pt"))
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit the backbone"):
        build_fcn(21, str(tmp_path / "other.pt"))
