"""Folder DataModule (user supports + queries) and the episode-grid renderer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules import DatasetError, FolderEpisodeDataModule
from datamodules.fake import make_fake_voc
from datamodules.visualize import main as visualize_main


def _write(folder, name, h=40, w=60, mask=True):
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    if mask:
        m = np.zeros((h, w), dtype=np.uint8)
        m[5:20, 10:40] = 200
        m[0, :] = 255
        Image.fromarray(m).save(folder / f"{name}_mask.png")


def test_folder_episodes(tmp_path):
    for d in ("supports", "queries", "masks"):
        (tmp_path / d).mkdir()
    _write(tmp_path / "supports", "a")
    _write(tmp_path / "supports", "b", mask=False)
    Image.fromarray(np.full((40, 60), 1, dtype=np.uint8)).save(tmp_path / "masks" / "b.png")
    _write(tmp_path / "queries", "q1", mask=False)
    _write(tmp_path / "queries", "q2", h=30, w=50)
    dm = FolderEpisodeDataModule(root=str(tmp_path), image_size=32, batch_size=2, class_id=7)
    batch = next(iter(dm.predict_dataloader()))
    assert batch.support_images.shape == (2, 2, 3, 32, 32) and batch.support_ids == [["a.jpg", "b.jpg"]] * 2
    assert batch.query_id == ["q1.jpg", "q2.jpg"] and batch.class_id.tolist() == [7, 7]
    assert (batch.query_label_orig[0] == 255).all() and batch.query_label_orig[0].shape == (40, 60)
    q2 = batch.query_label_orig[1]
    assert q2.shape == (30, 50) and (q2[5:20, 10:40] == 1).all() and (q2[0] == 255).all()
    assert (batch.support_masks[:, 1, :21] == 1).all()  # masks/b.png: all foreground (valid rows)
    one = FolderEpisodeDataModule(root=str(tmp_path), shot=1, image_size=32)
    assert next(iter(one.predict_dataloader())).support_images.shape[1] == 1


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"folder not found: .*supports"):
        FolderEpisodeDataModule(root=str(tmp_path)).predict_dataloader()
    (tmp_path / "supports").mkdir()
    (tmp_path / "queries").mkdir()
    _write(tmp_path / "supports", "lonely", mask=False)
    _write(tmp_path / "queries", "q")
    with pytest.raises(DatasetError, match=r"support image .*lonely.jpg has no mask"):
        FolderEpisodeDataModule(root=str(tmp_path)).predict_dataloader()


def test_visualize_writes_png(tmp_path):
    root = make_fake_voc(tmp_path / "voc", per_class=2)
    out = tmp_path / "grid.png"
    for split in ("train", "test"):
        visualize_main(["--datamodule", "Pascal5iDataModule", "--root", str(root), "--split", split,
                        "--num", "3", "--image-size", "48", "--out", str(out)])  # fmt: skip
        im = Image.open(out)
        assert (
            im.format == "PNG" and im.size[0] == 4 + 2 * (48 + 4) and im.size[1] > 3 * 48
        )  # make_grid padding 4
        assert np.asarray(im).std() > 10  # not blank
