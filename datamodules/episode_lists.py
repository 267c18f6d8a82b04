"""The saved test / validation episode lists: drawn once by an evaluation protocol, reused by every run."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .cache import atomic_write_json, read_json
from .protocols import Episode, EvalProtocol

EPISODE_LIST_VERSION = 1


def load_or_make_episode_list(
    path: str | os.PathLike,
    protocol: EvalProtocol,
    pools: Mapping[int, list[str]],
    counts: Mapping[str, Mapping[int, int]],
    num: int,
    max_shot: int,
    seed: int,
) -> list[Episode]:
    """The episode list saved at ``path``, or one drawn by ``protocol`` and written there atomically.

    The file stores a fingerprint of the data it was drawn from (the class pools, and for protocols
    that use them the novel classes present in each test image); a list drawn from other data is
    redrawn (with a warning). A hand-written list with ``"pool_fingerprint": null`` is always used as is.
    """
    fingerprint = protocol.fingerprint(pools, counts)
    data = read_json(path)
    if isinstance(data, dict) and data.get("version") == EPISODE_LIST_VERSION:
        if data.get("pool_fingerprint") in (None, fingerprint):
            return [(str(q), int(c), [str(s) for s in sup]) for q, c, sup in data["episodes"]]
        warnings.warn(f"episode list {path} was drawn from different data; redrawing it", stacklevel=2)
    episodes = protocol.draw(pools, counts, num, max_shot, seed)
    record = {
        "version": EPISODE_LIST_VERSION,
        "seed": seed,
        "max_shot": max_shot,
        "pool_fingerprint": fingerprint,
        "episodes": [[q, c, s] for q, c, s in episodes],
    }
    if protocol.draws != "spec":  # lists drawn by SPEC's rule keep their original layout
        record["draws"] = protocol.draws
    atomic_write_json(path, record)
    return episodes


def episode_list_path(
    directory: str | os.PathLike,
    name: str,
    fold: int,
    split: str,
    num: int,
    seed: int,
    max_shot: int,
    protocol: EvalProtocol,
) -> Path:
    """Where the ``split`` ("test" / "val") list of ``name``/``fold`` drawn by ``protocol``'s rule lives."""
    rule = "" if protocol.draws == "spec" else f"_{protocol.draws}"
    return Path(directory) / f"{name}_fold{fold}_{split}{rule}_n{num}_seed{seed}_maxshot{max_shot}.json"
