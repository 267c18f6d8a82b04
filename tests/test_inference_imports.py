"""The inference path in its own rooms: ``from fewshot_seg import Segmenter`` imports no training stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TRAINING_STACK = ("pytorch_lightning", "lightning", "datamodules", "albumentations", "pycocotools", "wandb")


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter: this test session has imported all of them already.
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_segmenter_imports_no_training_stack(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fewshot_seg import Segmenter\n"
        "from fewshot_seg.tools import segment, serve\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TRAINING_STACK!r})))\n"
    )
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_users_datamodules_folder_does_not_shadow_the_segmenter(tmp_path: Path) -> None:
    # Lightning projects often have their own datamodules/ package in the working directory.
    (tmp_path / "datamodules").mkdir()
    (tmp_path / "datamodules" / "__init__.py").write_text("raise ImportError('the user datamodules')\n")
    out = _run("from fewshot_seg import Segmenter; print(Segmenter.__name__)", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Segmenter"
