"""A user's images and masks: one mask convention everywhere, EXIF orientation, 16-bit greyscale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import DatasetError, FolderEpisodeDataModule
from fewshot_seg.user_images import mask_from_values, read_user_image, read_user_mask

EXIF_ORIENTATION = 0x0112


def _rotated_jpeg(path: Path, stored_hw: tuple[int, int] = (157, 161)) -> None:
    """A JPEG stored ``stored_hw`` with EXIF orientation 6 (displayed rotated 90°: ``161 x 157``)."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (*stored_hw, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    im.save(path, exif=exif)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 255], [0, 1]),  # the most common binary format: 255 is the object, not ignore
        ([0, 1], [0, 1]),
        ([255, 255], [1, 1]),
        # VOC (the ignore ring between background and object): 255 = ignore, other values = object. A value
        # between its two neighbours (0, 7, 255) is a ramp: greyscale (tests/test_mask_rule.py).
        ([0, 255, 7], [0, 255, 1]),
        ([0, 255, 1], [0, 255, 1]),
        ([0, 200], [0, 1]),
    ],
)
def test_mask_convention(values: list[int], expected: list[int]) -> None:
    out = mask_from_values(np.array([values], dtype=np.uint8))
    assert out.tolist() == [expected]


def test_mask_inputs_agree(tmp_path: Path) -> None:
    m = np.zeros((6, 8), dtype=np.uint8)
    m[1:4, 2:6] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    expected = (m == 255).astype(np.uint8)
    for source in (tmp_path / "m.png", str(tmp_path / "m.png"), Image.fromarray(m), m, m == 255):
        assert np.array_equal(read_user_mask(source), expected)
    Image.fromarray(m == 255).save(tmp_path / "bits.png")  # mode "1"
    assert np.array_equal(read_user_mask(tmp_path / "bits.png"), expected)


def test_bad_masks_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="support mask 2 holds values outside"):
        mask_from_values(np.array([[0, 300]]), "support mask 2")
    with pytest.raises(DatasetError, match=r"mask file is missing: .*nope.png"):
        read_user_mask(tmp_path / "nope.png")
    with pytest.raises(DatasetError, match=r"expected \[H, W\]"):
        read_user_mask(np.zeros((2, 2, 3), dtype=np.uint8))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "photo.jpg")
    assert read_user_image(tmp_path / "photo.jpg").shape == (161, 157, 3)  # as a viewer shows it
    with Image.open(tmp_path / "photo.jpg") as im:
        assert read_user_image(im).shape == (161, 157, 3)


def test_sixteen_bit_greyscale_scaled(tmp_path: Path) -> None:
    grey = np.linspace(0, 65535, 4 * 5).astype(np.uint16).reshape(4, 5)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    rgb = read_user_image(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 5, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255, 255, 255]
    assert np.array_equal(rgb[..., 0], np.round(grey / 257).astype(np.uint8))  # not all white
    Image.fromarray(np.zeros((3, 3), dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match=r"f.tif is a floating-point image"):
        read_user_image(tmp_path / "f.tif")


def test_folder_episodes_use_the_convention_and_exif(tmp_path: Path) -> None:
    for d in ("supports", "queries"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "supports" / "s.jpg")
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[10:30, 10:50] = 255  # a 0/255 mask: 255 is the object (was read as all-ignore)
    Image.fromarray(mask).save(tmp_path / "supports" / "s_mask.png")
    _rotated_jpeg(tmp_path / "queries" / "photo.jpg")
    dm = FolderEpisodeDataModule(root=str(tmp_path), image_size=32)
    batch = next(iter(dm.predict_dataloader()))
    assert (batch.support_masks == 1).sum() > 0 and not (batch.support_masks[0, 0, :20] == 255).any()
    assert batch.original_sizes == [(161, 157)]  # the displayed size, not the stored 157 x 161


def test_empty_support_mask_refused(tmp_path: Path) -> None:
    for d in ("supports", "queries"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "supports" / "s.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "supports" / "s_mask.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "queries" / "q.png")
    with pytest.raises(DatasetError, match=r"support mask .*s_mask.png marks no object pixel"):
        FolderEpisodeDataModule(root=str(tmp_path)).predict_dataloader()


@pytest.mark.parametrize("hw", [(37, 53), (53, 37), (480, 640), (1000, 333), (64, 64), (7, 300), (300, 1)])
def test_letterbox_equals_albumentations(hw: tuple[int, int]) -> None:
    # The data layer letterboxed with albumentations before; the OpenCV Letterbox must give the same values.
    import albumentations as A
    import cv2

    from fewshot_seg.episode import IGNORE_INDEX, PIXEL_MEAN
    from fewshot_seg.user_images import Letterbox

    size = 96
    rng = np.random.default_rng(sum(hw))
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 255], np.uint8), hw)
    resize = A.Compose([A.LongestMaxSize(max_size=size)])
    pad = A.Compose(
        [
            A.PadIfNeeded(
                size,
                size,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=tuple(float(m) for m in PIXEL_MEAN),
                fill_mask=IGNORE_INDEX,
            )
        ]
    )
    resized = resize(image=image, mask=label)
    expected = pad(image=resized["image"], mask=resized["mask"])
    got_image, got_label, valid = Letterbox(size)(image, label)
    assert valid == resized["mask"].shape
    np.testing.assert_array_equal(got_image, expected["image"])
    np.testing.assert_array_equal(got_label, expected["mask"])
