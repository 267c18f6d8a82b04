"""ResNet backbone: strides/channels, padding to /32, FrozenBatchNorm2d, weight loading without network."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fewshot_seg.models.backbone import build_backbone, imagenet_weights_path
from fewshot_seg.models.freezing import freeze, is_frozen


def _to_detectron2_name(key: str) -> str:
    """torchvision -> detectron2 ResNet names (the inverse of the converter, written independently)."""
    parts = key.split(".")
    if parts[0] == "conv1":
        return "stem.conv1." + parts[1]
    if parts[0] == "bn1":
        return "stem.conv1.norm." + parts[1]
    stage = int(parts[0][-1]) + 1
    block, mod, rest = parts[1], parts[2], ".".join(parts[3:])
    if mod == "downsample":
        sub, rest = parts[3], ".".join(parts[4:])
        return f"res{stage}.{block}.shortcut." + ("norm." if sub == "1" else "") + rest
    if mod.startswith("bn"):
        return f"res{stage}.{block}.conv{mod[-1]}.norm.{rest}"
    return f"res{stage}.{block}.{mod}.{rest}"


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 64), ("resnet50", 256)])
def test_shapes_strides_and_padding(name: str, channels: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, weights=None).eval()
    assert backbone.out_channels == {f"res{i}": channels * 2 ** (i - 2) for i in range(2, 6)}
    x = torch.randn(2, 3, 70, 45)  # padded to 96 x 64
    with torch.no_grad():
        feats = backbone(x)
        padded = backbone(F.pad(x, (0, 19, 0, 26)))
    for i in range(2, 6):
        stride = 2**i
        assert feats[f"res{i}"].shape == (2, backbone.out_channels[f"res{i}"], 96 // stride, 64 // stride)
        torch.testing.assert_close(feats[f"res{i}"], padded[f"res{i}"], atol=0, rtol=0)


def test_frozen_batchnorm_matches_eval_batchnorm() -> None:
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and dropped
    assert list(frozen.parameters()) == []
    assert set(dict(frozen.named_buffers())) == {"weight", "bias", "running_mean", "running_var"}
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x))
    assert frozen.eps == 1e-5


def test_frozen_bn_option_and_freeze() -> None:
    plain = build_backbone("resnet18", weights=None, frozen_bn=False)
    assert isinstance(plain.bn1, nn.BatchNorm2d)
    frozen = freeze(build_backbone("resnet18", weights=None))
    assert isinstance(frozen.layer1[0].bn1, FrozenBatchNorm2d)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert is_frozen(frozen) and not is_frozen(plain)


def test_load_torchvision_and_detectron2_files(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)  # BatchNorm2d: has num_batches_tracked and fc
    with torch.no_grad():
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
    state = source.state_dict()
    torch.save(state, tmp_path / "tv.pth")
    d2 = {
        "backbone." + _to_detectron2_name(k): v
        for k, v in state.items()
        if not k.startswith("fc.") and "num_batches_tracked" not in k
    }
    d2["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(3, 3)  # other parts are ignored
    torch.save({"model": d2, "iteration": 7}, tmp_path / "d2.pth")
    x = torch.randn(1, 3, 64, 64)
    source.eval()
    expected = source.layer4(
        source.layer3(source.layer2(source.layer1(source.maxpool(source.relu(source.bn1(source.conv1(x)))))))
    )
    for file in ("tv.pth", "d2.pth"):
        backbone = build_backbone("resnet18", weights=str(tmp_path / file)).eval()
        torch.testing.assert_close(backbone(x)["res5"], expected, atol=1e-5, rtol=1e-4)


def _no_download(calls: list):
    def fake(url, dst, *args, **kwargs):
        calls.append(url)
        raise OSError("network disabled in tests")

    return fake


def test_imagenet_missing_names_the_file_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    calls: list[str] = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download(calls))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet18", weights="imagenet")
    assert str(expected) in str(info.value) and "resnet18-f37072fd.pth" in str(info.value)
    assert len(calls) <= 1  # at most the (patched) download attempt, never a real request


def test_imagenet_loads_from_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    calls: list[str] = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download(calls))
    torch.manual_seed(2)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    backbone = build_backbone("resnet18", weights="imagenet")
    assert calls == []
    torch.testing.assert_close(backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    torch.testing.assert_close(backbone.bn1.running_var, state["bn1.running_var"])


def test_unknown_name_rejected() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        build_backbone("vgg16", weights=None)


def test_one_backbone_contract_read_by_mask_matching() -> None:
    from fewshot_seg.config import MaskMatchingConfig
    from fewshot_seg.models.backbone_base import Backbone, ShapeSpec
    from fewshot_seg.models.build import build_mask_matching
    from fewshot_seg.models.selection import PROPOSAL_STRIDE

    backbone = build_backbone("resnet18", weights=None)
    assert isinstance(backbone, Backbone)
    assert backbone.output_shape() == {
        "res2": ShapeSpec(64, 4),
        "res3": ShapeSpec(128, 8),
        "res4": ShapeSpec(256, 16),
        "res5": ShapeSpec(512, 32),
    }
    padded = backbone.pad(torch.ones(1, 3, 33, 64))
    assert padded.shape[-2:] == (64, 64) and padded[..., 33:, :].abs().sum() == 0
    mm = build_mask_matching(MaskMatchingConfig(), backbone.out_channels, 10)
    assert mm.size_divisibility == backbone.size_divisibility
    assert mm.stride == PROPOSAL_STRIDE == backbone.out_strides["res2"]
