"""``fewshot_seg.Segmenter``: masks back in Python, equal to ``predict``'s, from encoded supports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cfg, run_dir_args
from PIL import Image
from test_convert import _stage_keys
from test_user_images import _rotated_jpeg

from datamodules import DatasetError
from fewshot_seg import Segmenter
from fewshot_seg.checkpoints import CheckpointError
from fewshot_seg.cli import main


def _episode(folder: Path) -> dict[str, list[Path]]:
    """One support (0/255 mask) and four queries of other sizes, one of them EXIF-rotated."""
    rng = np.random.default_rng(3)
    (folder / "supports").mkdir(parents=True)
    (folder / "queries").mkdir()
    support = folder / "supports" / "s0.jpg"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(support)
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[8:30, 12:50] = 255
    Image.fromarray(mask).save(folder / "supports" / "s0_mask.png")
    queries = []
    for i, (h, w) in enumerate([(48, 64), (70, 40), (33, 90)]):
        q = folder / "queries" / f"q{i}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(q)
        queries.append(q)
    _rotated_jpeg(folder / "queries" / "q3.jpg", (50, 60))
    queries.append(folder / "queries" / "q3.jpg")
    return {"supports": [support], "masks": [folder / "supports" / "s0_mask.png"], "queries": queries}


@pytest.fixture(scope="module")
def segmenter(stage2_ckpt: Path) -> Segmenter:
    return Segmenter.from_checkpoint(stage2_ckpt, device="cpu")


def test_equals_predict(segmenter: Segmenter, stage2_ckpt: Path, tmp_path: Path) -> None:
    files = _episode(tmp_path / "episode")
    assert segmenter.image_size == 64  # the size the checkpoint was trained at
    main(
        [
            "predict",
            *cfg("stage2_mm_cpu_demo.yaml", "trainer.yaml"),
            "--data=datamodules.FolderEpisodeDataModule",
            *run_dir_args(tmp_path / "runs"),
            f"--data.root={tmp_path / 'episode'}",
            "--data.image_size=64",  # no stage1_checkpoint: a stage-2 checkpoint is self-contained
            f"--model.init_args.predict_dir={tmp_path / 'png'}",
            f"--ckpt_path={stage2_ckpt}",
        ]
    )
    supports = segmenter.encode_supports(files["supports"], files["masks"])
    masks = segmenter.segment(files["queries"], supports, batch_size=1)
    for query, mask in zip(files["queries"], masks):
        written = np.array(Image.open(tmp_path / "png" / f"{query.stem}_c1_mask.png")) // 255  # stems unique
        assert mask.dtype == np.uint8 and mask.shape == written.shape
        assert np.array_equal(mask, written), query.name
    assert masks[3].shape == (60, 50)  # displayed size of the EXIF-rotated query


def test_batches_inputs_and_probabilities(segmenter: Segmenter, tmp_path: Path) -> None:
    files = _episode(tmp_path / "episode")
    supports = segmenter.encode_supports(files["supports"], files["masks"])
    one = segmenter.segment(files["queries"], supports, batch_size=1, return_probabilities=True)
    eight = segmenter.segment(files["queries"], supports, batch_size=8, return_probabilities=True)
    for a, b in zip(one, eight):
        assert a.dtype == np.float32 and a.min() >= 0.0 and a.max() <= 1.0
        np.testing.assert_allclose(a, b, atol=1e-5)
    masks = segmenter.segment(files["queries"], supports, batch_size=8)
    for p, m in zip(eight, masks):
        assert np.array_equal(m, (p > 0.5).astype(np.uint8))
    # Paths, PIL images and arrays of the same pictures give the same result.
    arrays = [np.array(Image.open(q).convert("RGB")) for q in files["queries"][:3]]
    pil = [Image.open(q) for q in files["queries"][:3]]
    by_path = segmenter.segment(files["queries"][:3], supports)
    for other in (segmenter.segment(arrays, supports), segmenter.segment(pil, supports)):
        assert all(np.array_equal(a, b) for a, b in zip(by_path, other))
    sup_arrays = segmenter.encode_supports(
        [np.array(Image.open(files["supports"][0]))], [np.array(Image.open(files["masks"][0])) == 255]
    )
    assert all(np.array_equal(a, b) for a, b in zip(by_path, segmenter.segment(arrays, sup_arrays)))


def test_five_shots_encoded_once(segmenter: Segmenter, tmp_path: Path, monkeypatch) -> None:
    files = _episode(tmp_path / "episode")
    calls: list[int] = []
    forward = segmenter.backbone.forward
    monkeypatch.setattr(segmenter.backbone, "forward", lambda x: calls.append(x.shape[0]) or forward(x))
    supports = segmenter.encode_supports(files["supports"] * 5, files["masks"] * 5)
    assert supports.shot == 5 and calls == [5]
    segmenter.segment(files["queries"], supports, batch_size=2)
    assert calls == [5, 2, 2]  # the supports never pass through the backbone again


def test_large_query(segmenter: Segmenter, tmp_path: Path) -> None:
    files = _episode(tmp_path / "episode")
    supports = segmenter.encode_supports(files["supports"], files["masks"])
    big = np.zeros((4000, 6000, 3), dtype=np.uint8)
    (mask,) = segmenter.segment([big], supports)
    assert mask.shape == (4000, 6000)


def test_clear_errors(segmenter: Segmenter, stage1_ckpt: Path, tmp_path: Path) -> None:
    files = _episode(tmp_path / "episode")
    with pytest.raises(CheckpointError, match=r"is a stage-1 \(POSModule\) checkpoint"):
        Segmenter.from_checkpoint(stage1_ckpt, device="cpu")
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope.ckpt' does not exist"):
        Segmenter.from_checkpoint(tmp_path / "nope.ckpt")
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(small)
    with pytest.raises(
        DatasetError, match=r"support mask 0 .*small_mask.png is 10x10 but its image .*s0.jpg is 64x48"
    ):
        segmenter.encode_supports(files["supports"], [small])
    empty = np.zeros((48, 64), np.uint8)
    with pytest.raises(DatasetError, match=r"support mask 0 marks no object pixel"):
        segmenter.encode_supports(files["supports"], [empty])
    with pytest.raises(DatasetError, match="2 images but 1 masks"):
        segmenter.encode_supports(files["supports"] * 2, files["masks"])
    supports = segmenter.encode_supports(files["supports"], files["masks"])
    with pytest.raises(DatasetError, match=r"cannot read query 1 .*bad.jpg"):
        (tmp_path / "bad.jpg").write_text("not an image")
        segmenter.segment([files["queries"][0], tmp_path / "bad.jpg"], supports)


def test_reference_checkpoint(tmp_path: Path) -> None:
    # The authors' released stage-2 file format (detectron2 names), random values: depth read from keys.
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in _stage_keys()[2]:
        fill = torch.ones(shape) if key.endswith("running_var") else torch.randn(shape, generator=gen) * 0.02
        state[key] = fill
    torch.save({"model": state}, tmp_path / "mmformer_step2.pth")
    seg = Segmenter.from_checkpoint(tmp_path / "mmformer_step2.pth", device="cpu", image_size=64)
    assert seg.image_size == 64 and len(seg.backbone.layer3) == 6  # ResNet-50
    assert torch.equal(seg.mask_matching.fc1.weight, state["fc1.weight"])
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[5:20, 5:30] = 1
    (out,) = seg.segment([image], seg.encode_supports([image], [mask]))
    assert out.shape == (40, 50)
    del state["fc1.weight"], state["fc2.weight"], state["fc1.bias"], state["fc2.bias"]
    state = {k: v for k, v in state.items() if not k.startswith(("conv_", "crossat_"))}
    torch.save({"model": state}, tmp_path / "step1.pth")
    with pytest.raises(CheckpointError, match="holds no Mask Matching weights"):
        Segmenter.from_checkpoint(tmp_path / "step1.pth", device="cpu")
