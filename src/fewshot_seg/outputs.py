"""Where masks go: one naming, one output-folder check and one atomic writer for ``predict``,
``fewshot-seg segment`` and the zip of ``fewshot-seg serve``.

Naming (:class:`OutputNames`): an input ``sub/a.jpg`` gives ``sub/a_mask.png`` (and ``sub/a_overlay.png``);
two inputs that would share a name keep their extension (``a.jpg_mask.png``, ``a.png_mask.png``); the
same input named again (a repeated episode, a second upload of one file) gets ``-2``, ``-3``, ...
``predict`` puts the episode's class after the name (``a_c1_mask.png``): one query may be predicted for
several classes. Files are written under a temporary name ``.<name>.<pid>.tmp`` in the same folder and
renamed (``fewshot_seg.atomic``), so an interrupted run never leaves a half-written mask that a later run
would take as done.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from PIL import Image

from fewshot_seg.atomic import write_atomic

MASK_SUFFIX = "_mask.png"
OVERLAY_SUFFIX = "_overlay.png"
OUTPUT_SUFFIXES = (MASK_SUFFIX, OVERLAY_SUFFIX)


class OutputError(ValueError):
    """An output folder that cannot or must not be written (named in the message)."""


def _without_extension(name: str) -> str:
    path = PurePosixPath(name)
    return path.with_suffix("").as_posix() if path.suffix else name


class OutputNames:
    """Output stems (relative paths without the ``_mask.png`` suffix) for input names, unique in one run.

    Args:
        names: every input name the run will write (paths relative to their folder, with extensions); a
            name not given here keeps its extension only if a given name shares its stem.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        distinct = set(names)
        stems = Counter(_without_extension(n) for n in distinct)
        self._keep_extension = {n for n in distinct if stems[_without_extension(n)] > 1}
        self._taken: set[str] = set()

    def stem(self, name: str, suffix: str = "") -> str:
        """The stem of ``name`` (+ ``suffix``, e.g. ``_c1``), ``-2``, ``-3``, ... when already taken."""
        base = (name if name in self._keep_extension else _without_extension(name)) + suffix
        stem, n = base, 2
        while stem in self._taken:
            stem, n = f"{base}-{n}", n + 1
        self._taken.add(stem)
        return stem


def save_png_atomic(image: Image.Image, path: Path) -> None:
    """Write ``image`` as PNG at ``path`` (parents created) by ``fewshot_seg.atomic.write_atomic``: the one
    atomic writer (a temporary ``.<name>.<pid>.tmp`` beside it, then a rename)."""
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def check_output_folder(folder: Path, inputs: Path | None = None, overwrite: bool = True) -> None:
    """Refuse, before any work, an output folder that would lose or mix up files.

    Args:
        folder: where outputs go (created here if missing).
        inputs: a folder that is read as input: outputs inside it would be read back on the next run.
        overwrite: allow replacing outputs (``*_mask.png`` / ``*_overlay.png``) already in ``folder``.

    Raises:
        OutputError: the folder is inside ``inputs``, holds earlier outputs (unless ``overwrite``), or
            cannot be created or written.
    """
    if inputs is not None and folder.resolve().is_relative_to(inputs.resolve()):
        raise OutputError(
            f"output folder {folder} is inside the input folder {inputs}: a later run would read its "
            "outputs as inputs; choose a folder outside it"
        )
    if not overwrite and folder.is_dir():
        earlier = [p for p in folder.rglob("*") if p.name.endswith(OUTPUT_SUFFIXES)]
        if earlier:
            raise OutputError(
                f"output folder {folder} already holds {len(earlier)} output file(s) of an earlier run "
                f"(e.g. {earlier[0]}): choose another folder, or allow replacing them "
                "(predict: --model.init_args.overwrite_predictions=true)"
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to output folder {folder}: {err.strerror or err}") from err
