"""Reference checkpoint conversion on synthetic full-size key sets (mmformer_state_dict_keys.txt)."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.convert import (
    CheckpointMismatchError,
    load_reference_checkpoint,
    load_reference_module,
)
from fewshot_seg.models.pos import PotentialObjectsSegmenter

KEYS_FILE = Path(__file__).resolve().parent / "data" / "mmformer_state_dict_keys.txt"
KNOWN_UNUSED = re.compile(r"sem_seg_head\.pixel_decoder\.crossat_|crossat_3\.|criterion\.empty_weight$")


def _stage_keys() -> dict[int, list[tuple[str, list[int]]]]:
    if not KEYS_FILE.exists():
        pytest.skip(f"{KEYS_FILE} not available")
    stages: dict[int, list[tuple[str, list[int]]]] = {}
    stage = 0
    for line in KEYS_FILE.read_text().splitlines():
        m = re.match(r"## STAGE (\d)", line)
        if m:
            stage = int(m.group(1))
        elif "\t" in line:
            key, shape, _ = line.split("\t")
            stages.setdefault(stage, []).append(
                (key, [int(s) for s in shape.strip("[]").split(",") if s.strip()])
            )
    return stages


def _synthetic(keys: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    # Every tensor filled with its own index: shows where each value landed (cheaper than randn at 55 M).
    return {key: torch.full(shape, float(i)) for i, (key, shape) in enumerate(keys)}


def _mask_matching() -> nn.Module:
    from fewshot_seg.models.mask_matching import MaskMatching

    return MaskMatching()


@pytest.fixture(scope="module")
def modules() -> tuple[nn.Module, nn.Module, nn.Module]:
    return build_backbone("resnet50", weights=None), PotentialObjectsSegmenter(), _mask_matching()


def _assert_values_landed(module: nn.Module, expected: dict[str, float]) -> None:
    state = module.state_dict()
    for name, value in expected.items():
        assert torch.all(state[name] == value), name


@pytest.mark.parametrize("stage", [1, 2])
def test_full_checkpoint_every_key_loaded_or_skipped(stage: int, modules) -> None:
    backbone, pos, mm = modules
    keys = _stage_keys()[stage]
    state = _synthetic(keys)
    report = load_reference_checkpoint(
        {"model": state}, backbone=backbone, pos=pos, mask_matching=mm if stage == 2 else None
    )
    assert report.ok and not report.ignored
    assert sorted(report.loaded + report.skipped) == sorted(state)
    assert sorted(report.skipped) == sorted(k for k in state if KNOWN_UNUSED.match(k))
    assert len(report.loaded) == len(backbone.state_dict()) + len(pos.state_dict()) + (
        len(mm.state_dict()) if stage == 2 else 0
    )
    index = {k: float(i) for i, (k, _) in enumerate(keys)}
    _assert_values_landed(
        backbone,
        {
            "conv1.weight": index["backbone.stem.conv1.weight"],
            "bn1.running_var": index["backbone.stem.conv1.norm.running_var"],
            "layer1.0.downsample.0.weight": index["backbone.res2.0.shortcut.weight"],
            "layer1.0.downsample.1.bias": index["backbone.res2.0.shortcut.norm.bias"],
            "layer4.2.conv3.weight": index["backbone.res5.2.conv3.weight"],
            "layer3.5.bn2.running_mean": index["backbone.res4.5.conv2.norm.running_mean"],
        },
    )
    _assert_values_landed(
        pos,
        {
            "pixel_decoder.transformer.level_embed": index[
                "sem_seg_head.pixel_decoder.transformer.level_embed"
            ],
            "pixel_decoder.adapter_1.norm.weight": index["sem_seg_head.pixel_decoder.adapter_1.norm.weight"],
            "transformer_decoder.transformer_ffn_layers.8.linear2.bias": index[
                "sem_seg_head.predictor.transformer_ffn_layers.8.linear2.bias"
            ],
            "transformer_decoder.query_embed.weight": index["sem_seg_head.predictor.query_embed.weight"],
        },
    )
    if stage == 2:
        _assert_values_landed(mm, {"fc2.bias": index["fc2.bias"], "conv_1.weight": index["conv_1.weight"]})


def test_missing_parts_are_listed_as_ignored(modules) -> None:
    _, pos, _ = modules
    state = _synthetic(_stage_keys()[2])
    report = load_reference_checkpoint(state, pos=pos)
    assert report.ok
    assert "backbone.res3.0.conv1.weight" in report.ignored and "fc1.weight" in report.ignored
    assert "crossat_3.transformer_ffn_layers.0.norm.bias" in report.skipped
    assert not any(k.startswith("sem_seg_head.") for k in report.ignored)


def test_unknown_missing_and_mismatched_keys_raise_by_name(modules) -> None:
    backbone, pos, _ = modules
    keys = _stage_keys()[1]
    state = _synthetic(keys)
    before = pos.transformer_decoder.query_feat.weight.clone()

    unknown = dict(state, **{"sem_seg_head.predictor.class_embed.weight": torch.zeros(151, 256)})
    with pytest.raises(CheckpointMismatchError, match=r"sem_seg_head\.predictor\.class_embed\.weight"):
        load_reference_checkpoint(unknown, backbone=backbone, pos=pos)
    toplevel = dict(state, **{"some_head.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match=r"some_head\.weight"):
        load_reference_checkpoint(toplevel, backbone=backbone, pos=pos)

    missing = dict(state)
    del missing["sem_seg_head.predictor.decoder_norm.bias"]
    with pytest.raises(
        CheckpointMismatchError, match=r"pos\.transformer_decoder\.decoder_norm\.bias"
    ) as info:
        load_reference_checkpoint(missing, backbone=backbone, pos=pos)
    assert info.value.report.missing == ["pos.transformer_decoder.decoder_norm.bias"]

    bad_shape = dict(state, **{"backbone.res2.0.conv1.weight": torch.zeros(64, 64, 3, 3)})
    with pytest.raises(CheckpointMismatchError, match=r"backbone\.res2\.0\.conv1\.weight"):
        load_reference_checkpoint(bad_shape, backbone=backbone, pos=pos)
    # Nothing was loaded by the failed strict calls.
    assert torch.equal(pos.transformer_decoder.query_feat.weight, before)

    report = load_reference_checkpoint(missing, backbone=backbone, pos=pos, strict=False)
    assert report.missing == ["pos.transformer_decoder.decoder_norm.bias"] and not report.ok


def test_stage1_checkpoint_with_mask_matching_reports_missing(modules) -> None:
    backbone, pos, mm = modules
    with pytest.raises(CheckpointMismatchError, match=r"mask_matching\.conv_0\.weight") as info:
        load_reference_checkpoint(_synthetic(_stage_keys()[1]), backbone=backbone, pos=pos, mask_matching=mm)
    assert sorted(info.value.report.missing) == sorted("mask_matching." + k for k in mm.state_dict())


def test_checkpoint_file_and_module_kinds(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = dict(
        in_channels={"res2": 8, "res3": 8, "res4": 8, "res5": 8},
        conv_dim=32,
        mask_dim=8,
        hidden_dim=32,
        num_queries=3,
        enc_layers=1,
        enc_heads=2,
        enc_ffn=16,
        dec_layers=2,
        dec_heads=2,
        dec_ffn=16,
    )
    source, target = PotentialObjectsSegmenter(**small), PotentialObjectsSegmenter(**small)
    ref = {
        "sem_seg_head." + k.replace("transformer_decoder.", "predictor."): v
        for k, v in source.state_dict().items()
    }
    ref["criterion.empty_weight"] = torch.ones(151)
    torch.save({"model": ref, "iteration": 3}, tmp_path / "model_final.pth")
    report = load_reference_checkpoint(tmp_path / "model_final.pth", pos=target)
    assert report.skipped == ["criterion.empty_weight"]
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # Module-level API with "pos" accepts names with and without the sem_seg_head prefix.
    stripped = {k.removeprefix("sem_seg_head."): v for k, v in ref.items() if k.startswith("sem_seg_head.")}
    assert load_reference_module(PotentialObjectsSegmenter(**small), stripped, "pos").ok
    with pytest.raises(ValueError, match="kind"):
        load_reference_module(target, stripped, "unknown_kind")


def test_mask_matching_kind_skips_crossat_3() -> None:
    module = nn.Module()
    module.fc1 = nn.Linear(2, 3)
    state = {
        "fc1.weight": torch.ones(3, 2),
        "fc1.bias": torch.ones(3),
        "crossat_3.norm.weight": torch.ones(4),
    }
    report = load_reference_module(module, state, "mask_matching")
    assert report.skipped == ["crossat_3.norm.weight"] and sorted(report.loaded) == ["fc1.bias", "fc1.weight"]
