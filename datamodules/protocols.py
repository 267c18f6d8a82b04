"""Evaluation protocols: how test / validation episodes are drawn, and at what resolution they are scored.

A protocol is a small object with two parts:

* :meth:`EvalProtocol.draw` makes the saved list of ``(query, class, supports)`` episodes from the test
  images' class pools and per-image class pixel counts (seeded, so the list is the same on every run);
* :attr:`EvalProtocol.square` says how episodes are resized and scored: ``False`` keeps the aspect ratio
  (long side = ``image_size``, padded) and scores at the original label size; ``True`` stretches query,
  label and supports to ``image_size x image_size`` and scores there.

Adding a protocol (HSNet's, PFENet's, ...) is one subclass registered in :data:`PROTOCOLS`.
``docs/data.md`` compares them and names the published numbers that used each; ``docs/benchmarks.md``
describes the benchmark protocols (``hsnet_fss``, ``patnet``, ``lvis92i``) and the code they follow.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np

from .errors import DatasetError

Episode = tuple[str, int, list[str]]
"""(query id, class id, support ids) of a listed episode."""

ProtocolName = Literal["spec", "square480", "mmformer", "hsnet_fss", "patnet", "lvis92i"]


def _membership(pools: Mapping[int, Sequence[str]]) -> dict[str, list[int]]:
    """image id -> sorted classes whose pool holds it."""
    membership: dict[str, list[int]] = {}
    for c, ids in sorted(pools.items()):
        for i in ids:
            membership.setdefault(i, []).append(c)
    return membership


def _hash(payload: object) -> str:
    return hashlib.sha1(json.dumps(payload).encode()).hexdigest()


def _no_queries(pools: Mapping[int, Sequence[str]]) -> DatasetError:
    return DatasetError(f"no image qualifies for any of the classes {sorted(pools)}: cannot draw episodes")


class EvalProtocol(ABC):
    """How episodes are drawn (:meth:`draw`) and scored (:attr:`square`)."""

    name: ClassVar[str]
    square: ClassVar[bool]
    """Resize query, label and supports to ``image_size`` squares and score there (else: keep aspect,
    score at the original label size)."""
    draws: ClassVar[str]
    """Name of the episode-drawing rule; protocols that draw alike share saved lists."""
    published_size: ClassVar[int | None] = None
    """The ``image_size`` the published numbers of this protocol were scored at (None: not fixed)."""
    image_resize: ClassVar[str] = "cv2"
    """How test images are resized by default: "cv2" (OpenCV bilinear, no antialiasing) or "pil"
    (torchvision ``Resize`` of the PIL image: antialiased bilinear, what the published loaders do)."""

    def fingerprint(self, pools: Mapping[int, Sequence[str]], counts: Mapping[str, Mapping[int, int]]) -> str:
        """A hash of what :meth:`draw` reads: a saved list with another fingerprint is redrawn."""
        return _hash({str(c): list(v) for c, v in sorted(pools.items())})

    @abstractmethod
    def draw(
        self,
        pools: Mapping[int, Sequence[str]],
        counts: Mapping[str, Mapping[int, int]],
        num: int,
        max_shot: int,
        seed: int,
    ) -> list[Episode]:
        """``num`` episodes over the novel classes.

        Args:
            pools: novel class -> sorted ids of the test images where it covers >= the pool threshold.
            counts: test image id -> {class id: pixel count} of every labelled class (not 0 or 255).
            num: episodes to draw.
            max_shot: supports drawn per episode; a K-shot run uses the first K, so the 1-shot list is
                the first support of the ``max_shot`` list.
            seed: seed of the one generator all draws come from.
        """


class SpecProtocol(EvalProtocol):
    """SPEC §5: query uniform over the union of the novel class pools; class uniform among the query's pool
    classes; ``min(max_shot, pool - 1)`` distinct supports of that class, never the query. Scored at
    the original label size (PFENet/CyCTR "original label" evaluation)."""

    name = "spec"
    square = False
    draws = "spec"

    def draw(self, pools, counts, num, max_shot, seed):
        membership = _membership(pools)
        queries = sorted(membership)
        if not queries:
            raise _no_queries(pools)
        rng = np.random.default_rng(seed)
        episodes: list[Episode] = []
        for _ in range(num):
            q = queries[int(rng.integers(len(queries)))]
            c = membership[q][int(rng.integers(len(membership[q])))]
            candidates = [i for i in pools[c] if i != q]
            k = min(max_shot, len(candidates))
            picks = rng.choice(len(candidates), size=k, replace=False)
            episodes.append((q, c, [candidates[int(j)] for j in picks]))
        return episodes


class Square480Protocol(SpecProtocol):
    """The :class:`SpecProtocol` episodes, resized to ``image_size`` squares (480 in the reference) and
    scored there, as the reference's evaluator does."""

    name = "square480"
    square = True
    published_size = 480


class MMFormerProtocol(EvalProtocol):
    """The authors' test sampler (MM-Former ``mask2former/data/utils.py``, ``load_fewshot_val1000``).

    * Queries: the fold's test-image list (PFENet's rule: every image holding at least one novel class
      over the pool threshold, once each) repeated in whole passes until it has ``num`` entries or
      more, shuffled once, the first ``num`` taken: every image is a query about equally often.
    * Class: uniform among *all* novel classes present in the query's label (any pixel count).
    * Supports: uniform from that class's pool, never the query; distinct when the pool holds more
      than ``max_shot`` images (else repeats are allowed, as in the reference).
    * Query, label and supports resized to ``image_size`` squares (480) and scored there.

    The reference draws with Python's ``random`` seeded per fold by detectron2; this draws the same
    kind of list from one NumPy generator, so its episodes are not the reference's own.
    """

    name = "mmformer"
    square = True
    draws = "mmformer"
    published_size = 480

    def fingerprint(self, pools, counts):
        novel = set(pools)
        present = {i: sorted(c for c in counts.get(i, {}) if c in novel) for i in sorted(counts)}
        return _hash({"pools": {str(c): list(v) for c, v in sorted(pools.items())}, "present": present})

    def draw(self, pools, counts, num, max_shot, seed):
        novel = set(pools)
        queries = sorted(_membership(pools))
        if not queries:
            raise _no_queries(pools)
        entries = queries * math.ceil(num / len(queries))
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(entries))[:num]
        episodes: list[Episode] = []
        for j in order:
            q = entries[int(j)]
            present = sorted(c for c, n in counts.get(q, {}).items() if c in novel and n > 0)
            c = present[int(rng.integers(len(present)))]
            candidates = [i for i in pools[c] if i != q]
            if not candidates:
                raise DatasetError(
                    f"class {c} is in test image {q!r} but no other test image qualifies for its pool: "
                    "no support can be drawn"
                )
            if len(pools[c]) > max_shot:
                picks = rng.choice(len(candidates), size=max_shot, replace=False)
            else:
                picks = rng.integers(len(candidates), size=max_shot)
            episodes.append((q, c, [candidates[int(p)] for p in picks]))
        return episodes


def _supports_with_repeats(
    rng: np.random.Generator, pool: Sequence[str], query: str, class_id: int, max_shot: int
) -> list[str]:
    """``max_shot`` supports drawn uniformly from ``pool`` without the query, repeats allowed (HSNet's
    rejection loop draws from this same distribution)."""
    candidates = [i for i in pool if i != query]
    if not candidates:
        raise DatasetError(
            f"class {class_id} has no test image besides {query!r}: a support other than the query cannot be "
            "drawn"
        )
    return [candidates[int(j)] for j in rng.integers(len(candidates), size=max_shot)]


class PublishedLoaderProtocol(EvalProtocol):
    """Test images as the FSS-1000, cross-domain and LVIS-92i loaders give them: ``published_size`` squares
    made by torchvision's antialiased ``transforms.Resize`` on PIL images (juhongm999/hsnet and
    slei109/PATNet ``data/dataset.py``, aim-uofa/Matcher ``matcher/data/dataset.py``)."""

    square = True
    published_size = 400
    image_resize = "pil"


class HSNetFSSProtocol(PublishedLoaderProtocol):
    """HSNet's FSS-1000 test (juhongm999/hsnet ``data/fss.py``), scored at ``image_size`` squares (400).

    * ``num`` equal to the number of test images (the default of :class:`~datamodules.fss.FSS1000DataModule`):
      every test image is the query exactly once, classes in id order (alphabetical, as HSNet sorts
      them), images in file-name order within a class (2,400 episodes on FSS-1000).
    * any other ``num``: queries drawn uniformly over the test images (SPEC's query-uniform rule), for
      a fixed episode count.
    * Supports: uniform over the query's class pool without the query, repeats allowed.
    """

    name = "hsnet_fss"
    draws = "hsnet_fss"

    def draw(self, pools, counts, num, max_shot, seed):
        pairs = [(q, c) for c in sorted(pools) for q in pools[c]]
        if not pairs:
            raise _no_queries(pools)
        rng = np.random.default_rng(seed)
        if num != len(pairs):
            membership = _membership(pools)
            queries = sorted(membership)
            pairs = []
            for _ in range(num):
                q = queries[int(rng.integers(len(queries)))]
                pairs.append((q, membership[q][int(rng.integers(len(membership[q])))]))
        return [(q, c, _supports_with_repeats(rng, pools[c], q, c, max_shot)) for q, c in pairs]


class PATNetProtocol(PublishedLoaderProtocol):
    """PATNet's cross-domain test (slei109/PATNet ``data/deepglobe.py``, ``isic.py``, ``lung.py``).

    Episode ``i``'s class is the ``i mod n``-th of the ``n`` classes (round robin, by class id); its query
    is drawn uniformly from the class pool (queries may repeat); supports uniformly from the pool
    without the query, repeats allowed. Scored at ``image_size`` squares (400 in PATNet; 600 episodes).
    """

    name = "patnet"
    draws = "round_robin"

    def draw(self, pools, counts, num, max_shot, seed):
        classes = sorted(pools)
        if not classes:
            raise _no_queries(pools)
        short = [c for c in classes if len(pools[c]) < 2]
        if short:
            raise DatasetError(
                f"classes {short} have fewer than 2 test images: a query and a different support are needed"
            )
        rng = np.random.default_rng(seed)
        episodes: list[Episode] = []
        for i in range(num):
            c = classes[i % len(classes)]
            q = pools[c][int(rng.integers(len(pools[c])))]
            episodes.append((q, c, _supports_with_repeats(rng, pools[c], q, c, max_shot)))
        return episodes


class LVIS92iProtocol(PATNetProtocol):
    """Matcher's LVIS-92i test (aim-uofa/Matcher ``matcher/data/lvis.py``): the :class:`PATNetProtocol`
    round robin over the fold's classes (2,300 episodes = 25 per class), scored at ``image_size``
    squares (518 in Matcher), images resized as every Matcher benchmark's (PIL, antialiased)."""

    name = "lvis92i"
    published_size = 518


PROTOCOLS: dict[str, EvalProtocol] = {
    p.name: p
    for p in (
        SpecProtocol(),
        Square480Protocol(),
        MMFormerProtocol(),
        HSNetFSSProtocol(),
        PATNetProtocol(),
        LVIS92iProtocol(),
    )
}


def get_protocol(name: str) -> EvalProtocol:
    """The protocol called ``name``; a DatasetError lists the known ones."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise DatasetError(f"unknown evaluation protocol {name!r}; choose from {sorted(PROTOCOLS)}") from None
