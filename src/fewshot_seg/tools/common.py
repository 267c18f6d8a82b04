"""What ``fewshot-seg segment`` and ``fewshot-seg serve`` share: the model options, the loader and the
tools' own error kind. Imports no Lightning and no data layer (``tests/test_inference_imports.py``).

The outputs' naming, folder check and atomic writer are ``fewshot_seg.outputs`` (``predict`` writes
through them too); the folder scanner is ``fewshot_seg.user_images.scan_images``.
"""

from __future__ import annotations

import argparse

from fewshot_seg.checkpoints import CheckpointError
from fewshot_seg.errors import DatasetError
from fewshot_seg.outputs import OutputError
from fewshot_seg.segmenter import Segmenter


class ToolError(ValueError):
    """A tool option that cannot work (a device that is not there, an image size or batch size out of
    range); the message names the option."""


USER_ERRORS = (CheckpointError, DatasetError, OutputError, ToolError)
"""What a tool reports in one line (exit status 2) instead of a traceback."""


def model_tool_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A tool's parser with the options of :meth:`Segmenter.from_checkpoint` (``segment``, ``serve``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--ckpt", required=True, help="stage-2 checkpoint (or the authors' released file)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available; the default) | cpu | cuda"
    )
    parser.add_argument(
        "--precision",
        default="32",
        choices=("32", "bf16"),
        help="32 (default) | bf16: autocast, meant for CUDA",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="model input side (default: the size it was trained at)"
    )
    return parser


def load_segmenter(args: argparse.Namespace) -> Segmenter:
    """The Segmenter :func:`model_tool_parser`'s options describe.

    Raises:
        CheckpointError: the checkpoint (named) cannot be used.
        ToolError: ``--device``, ``--precision`` or ``--image-size`` cannot work here.
    """
    try:
        return Segmenter.from_checkpoint(args.ckpt, args.device, args.image_size, args.precision)
    except ValueError as err:  # the Segmenter's own checks name the parameter (device=, image_size ...)
        if isinstance(err, USER_ERRORS):
            raise
        raise ToolError(str(err)) from err
