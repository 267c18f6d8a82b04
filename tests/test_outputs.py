"""One naming and one atomic writer for the outputs of predict, segment and serve (fewshot_seg.outputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fewshot_seg.outputs import OutputNames, save_png_atomic
from fewshot_seg.user_images import scan_images


def test_extension_only_where_two_inputs_share_a_name() -> None:
    names = OutputNames(["a.jpg", "a.png", "c.webp", "sub/d.jpg", "sub/a.jpg"])
    got = [names.stem(n) for n in ["a.jpg", "a.png", "c.webp", "sub/d.jpg", "sub/a.jpg"]]
    assert got == ["a.jpg", "a.png", "c", "sub/d", "sub/a"]


def test_a_repeated_input_gets_a_number_and_a_suffix_counts_in_the_name() -> None:
    names = OutputNames(["q.jpg"])
    assert [names.stem("q.jpg"), names.stem("q.jpg"), names.stem("q.jpg")] == ["q", "q-2", "q-3"]
    names = OutputNames(["q.jpg"])  # predict: the class follows the name; one query, two classes
    assert [names.stem("q.jpg", "_c1"), names.stem("q.jpg", "_c2"), names.stem("q.jpg", "_c1")] == [
        "q_c1",
        "q_c2",
        "q_c1-2",
    ]


def test_atomic_writer_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a_mask.png"
    save_png_atomic(Image.fromarray(np.full((4, 5), 255, np.uint8)), path)
    assert np.asarray(Image.open(path)).shape == (4, 5)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a_mask.png"]


def test_one_scanner_skips_hidden_files_masks_and_the_output_folder(tmp_path: Path) -> None:
    for name in ("a.jpg", ".b.jpg", "a_mask.png", "notes.txt", ".DS_Store", "out/x.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    images, unsupported = scan_images(tmp_path, recursive=True, exclude=tmp_path / "out")
    assert [p.relative_to(tmp_path).as_posix() for p in images] == ["a.jpg", "sub/c.png"]
    assert [p.name for p in unsupported] == ["notes.txt"]
