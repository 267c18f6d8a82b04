"""Masks as people make them (anti-aliased, JPEG, palettes, alpha, VOC ids); malformed or empty files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from datamodules import DatasetError, FolderEpisodeDataModule
from fewshot_seg.user_images import (
    RULE_BINARY_1,
    RULE_BINARY_255,
    RULE_CLASS_IDS,
    RULE_GREYSCALE,
    read_user_image,
    read_user_mask,
    read_user_mask_and_rule,
    scan_images,
    voc_colormap,
)


def _square(size: int = 100, side: int = 60) -> np.ndarray:
    """``[size, size]`` uint8: a 0/255 square of ``side`` px (3,600 object pixels at the default)."""
    m = np.zeros((size, size), np.uint8)
    o = (size - side) // 2
    m[o : o + side, o : o + side] = 255
    return m


def _blurred(sigma: float = 1.5) -> np.ndarray:
    """The square painted with an anti-aliased brush: a smooth 0..255 edge ring."""
    return cv2.GaussianBlur(_square(), (0, 0), sigma)


def test_anti_aliased_mask_is_the_whole_object() -> None:
    # The VOC reading made the white interior "ignore" and only the grey edge ring the object.
    mask, rule = read_user_mask_and_rule(_blurred())
    assert rule == RULE_GREYSCALE
    assert not (mask == 255).any()
    assert abs(int((mask == 1).sum()) - 3600) <= 120  # the drawn square, up to its edge ring


def test_jpeg_mask_is_the_whole_object(tmp_path: Path) -> None:
    Image.fromarray(_square()).save(tmp_path / "m.jpg", quality=75)
    with Image.open(tmp_path / "m.jpg") as im:
        assert len(np.unique(np.asarray(im))) > 2  # JPEG ringing: not 0/255 any more
    mask, rule = read_user_mask_and_rule(tmp_path / "m.jpg")
    assert rule == RULE_GREYSCALE
    assert np.array_equal(mask, (_square() == 255).astype(np.uint8))


def test_voc_class_ids_keep_ignore() -> None:
    voc = np.zeros((40, 40), np.uint8)
    voc[10:30, 10:30] = 255  # the VOC ring of "ignore" around the object
    voc[12:28, 12:28] = 15
    mask, rule = read_user_mask_and_rule(voc)
    assert rule == RULE_CLASS_IDS
    assert (mask == 255).sum() == 20 * 20 - 16 * 16 and (mask == 1).sum() == 16 * 16


@pytest.mark.parametrize(
    ("values", "rule"), [((0, 255), RULE_BINARY_255), ((0, 1), RULE_BINARY_1), ((0, 100), RULE_CLASS_IDS)]
)
def test_binary_masks(values: tuple[int, int], rule: str) -> None:
    m = np.where(_square() == 255, values[1], values[0]).astype(np.uint8)
    mask, got = read_user_mask_and_rule(m)
    assert got == rule and np.array_equal(mask, (_square() == 255).astype(np.uint8))


def test_palette_mask_read_by_its_colours(tmp_path: Path) -> None:
    # PIL's own quantize(2) puts white at index 0: read by index, the mask would be inverted.
    im = Image.fromarray(_square()).convert("RGB").quantize(2)
    assert im.getpalette()[:3] == [255, 255, 255]
    im.save(tmp_path / "p.png")
    assert np.array_equal(read_user_mask(tmp_path / "p.png"), (_square() == 255).astype(np.uint8))
    # A VOC palette PNG (SegmentationClass): indices are class ids, 255 the ignore ring.
    voc = np.zeros((40, 40), np.uint8)
    voc[10:30, 10:30] = 255
    voc[12:28, 12:28] = 15
    p = Image.fromarray(voc, mode="P")
    p.putpalette(voc_colormap().ravel().tolist())
    p.save(tmp_path / "voc.png")
    mask, rule = read_user_mask_and_rule(tmp_path / "voc.png")
    assert rule == RULE_CLASS_IDS and (mask == 255).sum() == 20 * 20 - 16 * 16


def test_object_only_in_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., 3] = _square()  # black everywhere; the object is where it is opaque
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_user_mask(tmp_path / "a.png"), (_square() == 255).astype(np.uint8))


def test_folder_test_reads_anti_aliased_ground_truth(tmp_path: Path) -> None:
    for d in ("supports", "queries"):
        (tmp_path / d).mkdir()
    rng = np.random.default_rng(0)
    for d, name in (("supports", "s"), ("queries", "q")):
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(
            tmp_path / d / f"{name}.png"
        )
        Image.fromarray(_blurred()).save(tmp_path / d / f"{name}_mask.png")
    dm = FolderEpisodeDataModule(root=str(tmp_path), image_size=100)
    batch = next(iter(dm.test_dataloader()))
    scored = batch.query_label_orig[0]
    assert not (scored == 255).any()  # the interior is scored, not ignored
    assert abs(int((scored == 1).sum()) - 3600) <= 120


def test_thin_object_vanishing_at_the_model_size_is_named(tmp_path: Path) -> None:
    for d in ("supports", "queries"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((400, 400, 3), np.uint8)).save(tmp_path / "supports" / "s.png")
    thin = np.zeros((400, 400), np.uint8)
    thin[201, :] = 255  # one row: nearest-neighbour resizing to 32 px keeps no row of it
    Image.fromarray(thin).save(tmp_path / "supports" / "s_mask.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "queries" / "q.png")
    with pytest.raises(
        DatasetError, match=r"s_mask.png marks no object pixel once resized to the model input"
    ):
        FolderEpisodeDataModule(root=str(tmp_path), image_size=32).predict_dataloader()


def test_empty_image_is_named() -> None:
    with pytest.raises(DatasetError, match=r"query is empty \(0x0 pixels\)"):
        read_user_image(np.zeros((0, 0, 3), np.uint8), "query")
    with pytest.raises(DatasetError, match=r"image is empty"):
        read_user_image(Image.new("RGB", (0, 0)))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says ``width x height`` (RGB): tiny on disk, no pixel data to speak of."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_malformed_files_are_named(tmp_path: Path) -> None:
    _png_header_only(tmp_path / "huge.png", 20000, 20000)  # 400 MP: PIL's DecompressionBombError
    with pytest.raises(DatasetError, match=r"query .*huge.png is too large to read"):
        read_user_image(tmp_path / "huge.png", "query")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="BMP")
    (tmp_path / "cut.bmp").write_bytes(buf.getvalue()[:20])  # header cut short: struct.error inside PIL
    with pytest.raises(DatasetError, match=r"cannot read query .*cut.bmp"):
        read_user_image(tmp_path / "cut.bmp", "query")


def test_symlinked_sub_folder_is_scanned(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "q").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "elsewhere" / "a.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "q" / "b.png")
    (tmp_path / "q" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "q" / "loop").symlink_to(tmp_path / "q", target_is_directory=True)  # visited once
    images, _ = scan_images(tmp_path / "q", recursive=True)
    assert [p.relative_to(tmp_path / "q").as_posix() for p in images] == ["b.png", "linked/a.png"]
