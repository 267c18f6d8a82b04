"""The one exception type for bad input files (datasets, a person's images and masks), and the one mapping
of read failures to it. Here, not in ``datamodules``, so that the inference path (``Segmenter``, the tools)
raises it without importing the data layer; ``datamodules.errors`` re-exports it."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator

from PIL import Image


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the problem and the paths involved."""


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, kind: str = "an image") -> Iterator[None]:
    """Turn a failure to read ``path`` into one :class:`DatasetError` naming ``what`` and the file.

    Missing, a folder, or unreadable: PIL's ``OSError`` / ``SyntaxError`` / ``ValueError`` for a corrupt
    or foreign file, and what malformed headers raise besides (``struct.error``, ``IndexError``), or
    ``DecompressionBombError`` for an image of more pixels than PIL's limit (``Image.MAX_IMAGE_PIXELS``
    x 2). A DatasetError raised inside passes unchanged.
    """
    name = os.fspath(path)
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError as e:
        raise DatasetError(f"{what} file is missing: {name}") from e
    except IsADirectoryError as e:
        raise DatasetError(f"{what} {name} is a folder, not a file") from e
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{what} {name} is too large to read: {e}") from e
    except (OSError, SyntaxError, ValueError, struct.error, IndexError) as e:
        raise DatasetError(f"cannot read {what} {name} (corrupt or not {kind}): {e}") from e
