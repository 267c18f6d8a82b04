"""timm backbones: res2..res5 shapes / strides / channels per family, the ViT pyramid at sizes the patch
does not divide, weights from local files (and clear errors for missing, mismatched or offline ones),
frozen norms kept bit-identical (BatchNorm and LayerNorm families), the pyramid trained at lr x 1.

Tiny models at 45-96 px, random init; nothing is downloaded (HF_HUB_OFFLINE is set where a pretrained
tag is asked for).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from fewshot_seg.config import BackboneConfig, MaskMatchingConfig, OptimizerConfig, POSConfig, POSLossConfig
from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.mm_module import MMModule
from fewshot_seg.lightning.pos_module import POSModule
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.convert import CheckpointMismatchError
from fewshot_seg.models.freezing import freeze
from fewshot_seg.models.timm_backbone import BackboneWeightsError, TimmFeaturesBackbone, TimmViTBackbone

LEVELS = ("res2", "res3", "res4", "res5")
SMALL_POS = POSConfig(
    num_queries=8, dim=32, heads=4, enc_layers=1, enc_ffn=64, dec_layers=1, dec_ffn=64, norm_groups=8
)


def _check_levels(backbone: nn.Module, channels: dict[str, int]) -> None:
    """res2..res5 of a 70 x 45 input (padded to 96 x 64) have the ResNet trunk's sizes; padding is exact."""
    assert backbone.out_channels == channels
    assert backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    x = torch.randn(2, 3, 70, 45)
    with torch.no_grad():
        feats = backbone(x)
        padded = backbone(F.pad(x, (0, 19, 0, 26)))
    for i, name in enumerate(LEVELS):
        s = 4 * 2**i
        assert feats[name].shape == (2, channels[name], 96 // s, 64 // s), name
        torch.testing.assert_close(feats[name], padded[name], atol=0, rtol=0)


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("timm:convnext_atto", (40, 80, 160, 320)),  # LayerNorm family
        ("timm:resnet18", (64, 128, 256, 512)),  # BatchNorm; a stride-2 level too, not used
        ("timm:efficientnet_b0", (24, 40, 112, 320)),  # BatchNormAct2d; several levels per stride
        ("timm:swin_tiny_patch4_window7_224", (96, 192, 384, 768)),  # NHWC maps, 224 px by default
    ],
)
def test_hierarchical_levels(name: str, channels: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, weights=None).eval()
    assert isinstance(backbone, TimmFeaturesBackbone)
    _check_levels(backbone, dict(zip(LEVELS, channels, strict=True)))


def test_model_without_a_stride_4_level_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"'levit_128' has no feature level at stride\(s\) \[4, 8\]"):
        build_backbone("timm:levit_128", weights=None)
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_backbone("timm:no_such_net", weights=None)


@pytest.mark.parametrize("name", ["timm:vit_small_patch14_dinov2", "timm:vit_small_patch16_224"])
def test_vit_pyramid_at_sizes_the_patch_does_not_divide(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, weights=None, pyramid_channels=32).eval()
    assert isinstance(backbone, TimmViTBackbone)
    assert backbone.new_modules == ("pyramid",)
    _check_levels(backbone, dict.fromkeys(LEVELS, 32))  # 70 x 45: neither a multiple of 14 nor of 16
    # The tokens stand at stride 16 of the padded image: 6 x 4 of them for 96 x 64.
    patch = backbone.patch_size[0]
    assert backbone.tokens_input(torch.zeros(1, 3, 70, 45)).shape[-2:] == (6 * patch, 4 * patch)
    with torch.no_grad():
        tokens = backbone.trunk.forward_intermediates(
            backbone.tokens_input(torch.zeros(1, 3, 70, 45)), indices=1, intermediates_only=True
        )[-1]
    assert tokens.shape == (1, 384, 6, 4)
    # The pyramid's own parameters are the only ones outside the timm model.
    names = {n.split(".")[0] for n, _ in backbone.named_parameters()}
    assert names == {"trunk", "pyramid"}


def _random_timm_state(arch: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = timm.create_model(arch)
    with torch.no_grad():
        for m in model.modules():  # non-trivial norm parameters, so that loading them is visible
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_hierarchical_weights_from_a_local_file(suffix: str, tmp_path: Path) -> None:
    state = _random_timm_state("convnext_atto")
    path = tmp_path / f"convnext_atto{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state}, path)  # a wrapped state dict is unwrapped
    source = timm.create_model("convnext_atto").eval()
    source.load_state_dict(state)
    backbone = build_backbone("timm:convnext_atto", weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = source.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        got = backbone(x)
    for name, ref in zip(LEVELS, expected, strict=True):
        torch.testing.assert_close(got[name], ref, atol=0, rtol=0)
    random = build_backbone("timm:convnext_atto", weights=None).eval()
    with torch.no_grad():
        assert not torch.equal(random(x)["res5"], got["res5"])


def test_vit_weights_from_a_local_file(tmp_path: Path) -> None:
    state = _random_timm_state("vit_small_patch14_dinov2")
    path = tmp_path / "dinov2_s.safetensors"
    save_file(state, path)
    x = torch.randn(1, 3, 70, 45)
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same pyramid (new layers: random init)
        backbone = build_backbone("timm:vit_small_patch14_dinov2", weights=str(path)).eval()
        for k, v in backbone.trunk.state_dict().items():
            assert torch.equal(v, state[k]), k
        with torch.no_grad():
            outputs.append(backbone(x))
    for name in LEVELS:
        torch.testing.assert_close(outputs[0][name], outputs[1][name], atol=0, rtol=0)


def test_missing_and_mismatched_weights_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "convnext_atto.safetensors"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"backbone weights file '{missing}' does not exist")
    ):
        build_backbone("timm:convnext_atto", weights=str(missing))
    with pytest.raises(FileNotFoundError, match=r"backbone weights file '.*r18\.pth' does not exist"):
        build_backbone("resnet18", weights=str(tmp_path / "r18.pth"))
    r34 = tmp_path / "r34.pth"
    torch.save(build_backbone("resnet34", weights=None).state_dict(), r34)
    with pytest.raises(
        CheckpointMismatchError, match=r"backbone weights file '.*r34\.pth' does not fit resnet18"
    ):
        build_backbone("resnet18", weights=str(r34))

    state = _random_timm_state("convnext_atto")
    del state["stages.1.blocks.0.conv_dw.weight"]
    state["stages.0.blocks.0.gamma"] = torch.ones(3)
    state["extra.weight"] = torch.ones(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(BackboneWeightsError) as info:
        build_backbone("timm:convnext_atto", weights=str(bad))
    text = str(info.value)
    assert f"'{bad}' does not fit timm model 'convnext_atto'" in text
    assert "stages.1.blocks.0.conv_dw.weight" in text and "extra.weight" in text
    assert "size mismatch for stages.0.blocks.0.gamma" in text and "\n" not in text
    # Another model's file (same family, other widths).
    other = tmp_path / "femto.safetensors"
    save_file(_random_timm_state("convnext_femto"), other)
    with pytest.raises(
        BackboneWeightsError, match=r"femto\.safetensors' does not fit timm model 'convnext_atto'"
    ):
        build_backbone("timm:convnext_atto", weights=str(other))
    text_file = tmp_path / "notes.pth"
    text_file.write_text("not weights")
    with pytest.raises(
        BackboneWeightsError, match=r"notes\.pth' is not a readable safetensors / PyTorch file"
    ):
        build_backbone("timm:convnext_atto", weights=str(text_file))


def test_pretrained_tag_offline_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ValueError, match="two pretrained tags"):
        build_backbone("timm:convnext_atto.d2_in1k", weights="other_tag")
    for weights in ("pretrained", "imagenet", "d2_in1k"):
        with pytest.raises(FileNotFoundError) as info:
            build_backbone("timm:convnext_atto", weights=weights)
        text = str(info.value)
        assert text.startswith("timm pretrained weights of 'convnext_atto")
        assert "not available offline" in text and "backbone.weights=<a local" in text and "\n" not in text


def test_pos_and_mask_matching_take_the_backbone_widths() -> None:
    torch.manual_seed(0)
    model = MMModule(
        backbone=BackboneConfig(name="timm:convnext_atto", weights=None),
        pos=SMALL_POS,
        mm=MaskMatchingConfig(dim=16, heads=2, ffn=32, matching_hidden=8, kv_min_size=2),
    )
    decoder = model.pos.pixel_decoder
    # input_proj in the encoder's level order res5, res4, res3; the FPN lateral reads res2.
    assert [p[0].in_channels for p in decoder.input_proj] == [320, 160, 80]
    assert decoder.adapter_1.in_channels == 40
    assert [getattr(model.mm, f"conv_{i}").in_channels for i in range(3)] == [320, 160, 80]


def _batch() -> EpisodeBatch:
    """Two 64 x 64 episodes with one object each (stage-1 fields; the supports are not used)."""
    torch.manual_seed(1)
    semantic = torch.zeros(2, 64, 64, dtype=torch.long)
    semantic[:, 8:40, 16:48] = 1
    return EpisodeBatch(
        query_image=torch.randn(2, 3, 64, 64),
        query_mask=(semantic == 1).long(),
        support_images=torch.randn(2, 1, 3, 64, 64),
        support_masks=(semantic == 1).long()[:, None],
        class_id=torch.ones(2, dtype=torch.long),
        query_semantic=semantic,
        query_valid_size=torch.tensor([[64, 64], [64, 64]]),
    )


def _fit(model: POSModule, steps: int = 2) -> None:
    """Optimisation steps as Lightning runs them (the module's freezing callback and optimiser)."""
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    model.train()  # hostile start: the callback must put the frozen norms back in eval mode
    trainer.fit(model, DataLoader([_batch()] * steps, batch_size=None, collate_fn=lambda b: b))
    assert trainer.global_step == steps


def _pos_module(name: str, **backbone: object) -> POSModule:
    torch.manual_seed(0)
    return POSModule(
        backbone=BackboneConfig(name=name, weights=None, **backbone),
        pos=SMALL_POS,
        loss=POSLossConfig(num_points=64),
        optim=OptimizerConfig(lr=1e-2, max_steps=10),
        eval_class_ids=[1],
    )


@pytest.mark.parametrize(
    ("name", "norm"),
    [("timm:resnet18", nn.BatchNorm2d), ("timm:convnext_atto", nn.LayerNorm)],
)
def test_frozen_backbone_bit_identical_after_steps(name: str, norm: type[nn.Module]) -> None:
    # Real BatchNorm layers with running statistics (frozen_bn=False): only eval mode keeps them.
    model = _pos_module(name, freeze=True, frozen_bn=False)
    assert model.frozen_modules == ("backbone",)
    assert any(isinstance(m, norm) for m in model.backbone.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in frozen) == (norm is nn.BatchNorm2d)
    for k in frozen:  # weights, norm affine, running statistics, step counters
        assert torch.equal(before[k], after[k]), k
    assert not any(m.training for m in model.backbone.modules())
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("pos."))


def test_frozen_vit_trains_its_pyramid_only() -> None:
    model = _pos_module("timm:vit_small_patch14_dinov2", freeze=True, pyramid_channels=32)
    assert model.frozen_modules == ("backbone.trunk",)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model)
    after = model.state_dict()
    trunk = [k for k in before if k.startswith("backbone.trunk.")]
    assert any(".norm" in k for k in trunk)  # LayerNorms among them
    for k in trunk:
        assert torch.equal(before[k], after[k]), k
    assert not any(m.training for m in model.backbone.trunk.modules())
    pyramid = [k for k in before if k.startswith("backbone.pyramid.")]
    assert all(not torch.equal(before[k], after[k]) for k in pyramid if k.endswith("weight"))
    assert model.backbone.pyramid.training


def test_pyramid_learns_at_lr_x1_and_a_trainable_vit_at_lr_mult() -> None:
    model = _pos_module("timm:vit_small_patch14_dinov2", freeze=False, lr_mult=0.1, pyramid_channels=32)
    assert model.frozen_modules == ()
    groups = model.configure_optimizers()["optimizer"].param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {lr_of[id(p)] for p in model.backbone.trunk.parameters()} == {1e-3}
    assert {lr_of[id(p)] for p in model.backbone.pyramid.parameters()} == {1e-2}
    assert {lr_of[id(p)] for p in model.pos.parameters()} == {1e-2}
    frozen = _pos_module("timm:vit_small_patch14_dinov2", freeze=True, pyramid_channels=32)
    groups = frozen.configure_optimizers()["optimizer"].param_groups
    optimised = {id(p) for g in groups for p in g["params"]}
    assert optimised == {id(p) for p in [*frozen.backbone.pyramid.parameters(), *frozen.pos.parameters()]}


def test_freeze_makes_layer_and_group_norms_inert() -> None:
    backbone = freeze(build_backbone("timm:convnext_atto", weights=None))
    norms = [m for m in backbone.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    assert norms and all(not m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())


def test_any_input_size_on_older_timm() -> None:
    """Swin before timm 1.0.31 has no ``dynamic_img_size``; ``strict_img_size=False`` lets it take a 480
    input (its 1.0.29 build refused one: 'Input height (480) doesn't match model (384)')."""
    from fewshot_seg.models.timm_backbone import _model_kwargs

    class NewSwin(nn.Module):
        def __init__(self, img_size: int = 224, strict_img_size: bool = True, dynamic_img_size: bool = False):
            super().__init__()

    class OldSwin(nn.Module):
        def __init__(self, img_size: int = 224, strict_img_size: bool = True):
            super().__init__()

    assert _model_kwargs(NewSwin()) == {"dynamic_img_size": True}
    assert _model_kwargs(OldSwin()) == {"strict_img_size": False}
    assert _model_kwargs(nn.Conv2d(1, 1, 1)) == {}
