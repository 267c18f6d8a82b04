"""The one exception type the data layer raises for bad input."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the problem and the paths involved."""
