"""Load reference (detectron2-style MM-Former) state dicts into our modules.

Every reference key ends up in exactly one list of a :class:`LoadReport`: loaded, skipped (known-unused
reference modules, by name), ignored (a part for which no module was given), unexpected (unknown) or
mismatched (wrong shape); every key of our modules that received no value is listed as missing. Nothing is
dropped silently; with ``strict=True`` any unexpected / mismatched / missing key raises before anything is
loaded.

Name mapping (reference -> ours):

* ``backbone.stem.conv1.{weight,norm.*}`` -> ``conv1.weight`` / ``bn1.*``;
  ``backbone.res{s}.{b}.conv{j}.{weight,norm.*}`` -> ``layer{s-1}.{b}.conv{j}.weight`` / ``.bn{j}.*``;
  ``backbone.res{s}.{b}.shortcut.{weight,norm.*}`` -> ``layer{s-1}.{b}.downsample.{0,1}.*``
  (torchvision names are accepted unchanged).
* ``sem_seg_head.pixel_decoder.*`` -> ``pos.pixel_decoder.*``; ``sem_seg_head.predictor.*`` ->
  ``pos.transformer_decoder.*``.
* Mask Matching (``conv_i``, ``crossat_i``, ``fc1``, ``fc2``) and Cross-Alignment keys are identical.
* Skipped by name: ``sem_seg_head.pixel_decoder.crossat_*`` (unused pixel-decoder leftovers),
  ``crossat_3.*`` (unused stage-2 block), ``criterion.empty_weight``, and in backbone files the
  classifier ``fc.*`` and BatchNorm ``num_batches_tracked`` counters.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

KINDS = ("backbone", "pixel_decoder", "transformer_decoder", "pos", "mask_matching", "cross_alignment")

_D2_STEM = re.compile(r"stem\.conv1\.(norm\.)?(.+)")
_D2_BLOCK = re.compile(r"res([2-5])\.(\d+)\.(conv[1-3]|shortcut)\.(norm\.)?(.+)")
_MM_KEY = re.compile(r"(conv_\d+|crossat_\d+|fc[12])\.")


class CheckpointMismatchError(RuntimeError):
    """A reference state dict does not fit the module (names listed in the message and ``.report``)."""

    def __init__(self, message: str, report: LoadReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LoadReport:
    """Outcome of a conversion; every list holds key names."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unexpected or self.mismatched or self.missing)

    def merge(self, other: LoadReport, ref_prefix: str = "", our_prefix: str = "") -> None:
        self.loaded += [ref_prefix + k for k in other.loaded]
        self.skipped += [ref_prefix + k for k in other.skipped]
        self.ignored += [ref_prefix + k for k in other.ignored]
        self.unexpected += [ref_prefix + k for k in other.unexpected]
        self.mismatched += [ref_prefix + k for k in other.mismatched]
        self.missing += [our_prefix + k for k in other.missing]

    def summary(self, limit: int = 50) -> str:
        lines = [
            f"loaded {len(self.loaded)}, skipped {len(self.skipped)}, ignored {len(self.ignored)}, "
            f"unexpected {len(self.unexpected)}, mismatched {len(self.mismatched)}, "
            f"missing {len(self.missing)}"
        ]
        for title, names in (
            ("unexpected reference keys", self.unexpected),
            ("shape mismatches", self.mismatched),
            ("missing keys (ours)", self.missing),
        ):
            if names:
                shown = ", ".join(names[:limit]) + (
                    f", ... ({len(names) - limit} more)" if len(names) > limit else ""
                )
                lines.append(f"{title}: {shown}")
        return "\n".join(lines)

    def raise_if_incomplete(self) -> None:
        if not self.ok:
            raise CheckpointMismatchError("reference state dict does not match:\n" + self.summary(), self)


def _backbone_key(key: str) -> str | None:
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None  # classifier / BN step counter: skipped by name
    m = _D2_STEM.fullmatch(key)
    if m:
        return ("bn1." if m.group(1) else "conv1.") + m.group(2)
    m = _D2_BLOCK.fullmatch(key)
    if m:
        stage, block, conv, norm, rest = m.groups()
        prefix = f"layer{int(stage) - 1}.{block}."
        if conv == "shortcut":
            return prefix + ("downsample.1." if norm else "downsample.0.") + rest
        return prefix + (f"bn{conv[-1]}." if norm else f"{conv}.") + rest
    return key  # already torchvision-style


def _pos_key(key: str) -> str | None:
    key = key.removeprefix("sem_seg_head.")
    if key.startswith("pixel_decoder.crossat_"):
        return None
    if key.startswith("predictor."):
        return "transformer_decoder." + key.removeprefix("predictor.")
    return key


def _map_key(kind: str, key: str) -> str | None:
    """Our name for a reference key, or None when the key is known-unused (skipped by name)."""
    if kind == "backbone":
        return _backbone_key(key)
    if kind == "pixel_decoder":
        return None if key.startswith("crossat_") else key
    if kind == "pos":
        return _pos_key(key)
    if kind == "mask_matching":
        return None if key.startswith("crossat_3.") else key
    return key  # transformer_decoder, cross_alignment: identical names


def _plan(
    module: nn.Module, ref_state_dict: Mapping[str, Tensor], kind: str
) -> tuple[dict[str, Tensor], LoadReport]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    target = module.state_dict()
    report = LoadReport()
    new: dict[str, Tensor] = {}
    for ref_key, value in ref_state_dict.items():
        ours = _map_key(kind, ref_key)
        if ours is None:
            report.skipped.append(ref_key)
        elif ours not in target or ours in new:
            report.unexpected.append(ref_key)
        elif tuple(target[ours].shape) != tuple(value.shape):
            report.mismatched.append(f"{ref_key} {list(value.shape)} vs {ours} {list(target[ours].shape)}")
        else:
            new[ours] = value
            report.loaded.append(ref_key)
    report.missing = [k for k in target if k not in new]
    return new, report


def _apply(module: nn.Module, new: Mapping[str, Tensor]) -> None:
    result = module.load_state_dict(dict(new), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # _plan only keeps keys of the module


def load_reference_module(
    module: nn.Module, ref_state_dict: Mapping[str, Tensor], kind: str, *, strict: bool = True
) -> LoadReport:
    """Load a module-relative reference state dict (golden-file names) into ``module``.

    Args:
        module: our module (ResNetBackbone, MSDeformAttnPixelDecoder, MaskedTransformerDecoder,
            PotentialObjectsSegmenter, MaskMatching or CrossAlignment).
        ref_state_dict: reference keys relative to the module (``pos`` also accepts ``sem_seg_head.``).
        kind: one of :data:`KINDS`.
        strict: raise :class:`CheckpointMismatchError` (nothing loaded) on unexpected / mismatched /
            missing keys; otherwise load what fits and return the report.
    """
    new, report = _plan(module, ref_state_dict, kind)
    if strict:
        report.raise_if_incomplete()
    _apply(module, new)
    return report


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict inside a checkpoint object, whatever wraps it.

    Accepts a bare state dict, detectron2's ``{"model": ...}`` (optimizer etc. beside it), a Lightning
    or plain ``{"state_dict": ...}``, and DataParallel/DDP ``module.`` prefixes (removed).

    Raises:
        ValueError: ``obj`` holds no mapping of tensors; the message names ``source``.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:func:`unwrap_state_dict` of a file (read with ``weights_only=True``) or of an object in memory."""
    obj = path_or_state_dict
    source = "state dict"
    if isinstance(obj, (str, os.PathLike)):
        source = str(obj)
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj, source)


def load_reference_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    backbone: nn.Module | None = None,
    pos: nn.Module | None = None,
    mask_matching: nn.Module | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a full MM-Former checkpoint (stage 1 POS or stage 2 MMFormer) into the given modules.

    Keys of parts whose module is None are listed in ``report.ignored``. Missing keys are reported as
    ``backbone.*`` / ``pos.*`` / ``mask_matching.*`` (our names); the other lists hold reference names.
    With ``strict`` any problem raises :class:`CheckpointMismatchError` before anything is loaded.
    """
    state = read_state_dict(path_or_state_dict)
    report = LoadReport()
    parts: dict[str, dict[str, Tensor]] = {"backbone": {}, "pos": {}, "mask_matching": {}}
    prefixes = {"backbone": "backbone.", "pos": "sem_seg_head.", "mask_matching": ""}
    for key, value in state.items():
        if key == "criterion.empty_weight":
            report.skipped.append(key)
        elif key.startswith("backbone."):
            parts["backbone"][key.removeprefix("backbone.")] = value
        elif key.startswith("sem_seg_head."):
            parts["pos"][key.removeprefix("sem_seg_head.")] = value
        elif _MM_KEY.match(key):
            parts["mask_matching"][key] = value
        else:
            report.unexpected.append(key)
    modules = {"backbone": backbone, "pos": pos, "mask_matching": mask_matching}
    plans: list[tuple[nn.Module, dict[str, Tensor]]] = []
    for part, module in modules.items():
        if module is None:
            sub = LoadReport()
            for key in parts[part]:
                # Known-unused keys stay "skipped" even when their part is not loaded.
                kind = part
                (sub.skipped if _map_key(kind, key) is None else sub.ignored).append(key)
            report.merge(sub, prefixes[part])
            continue
        new, sub = _plan(module, parts[part], part)
        report.merge(sub, prefixes[part], part + ".")
        plans.append((module, new))
    if strict:
        report.raise_if_incomplete()
    for module, new in plans:
        _apply(module, new)
    return report


def has_mask_matching(state: Mapping[str, Tensor]) -> bool:
    """Whether a reference state dict holds Mask Matching weights (a released stage-2 model)."""
    return any(_MM_KEY.match(k.removeprefix("module.")) for k in state)


_RESNET_BY_RES4_BLOCKS = {6: "resnet50", 23: "resnet101"}


def reference_backbone_name(state: Mapping[str, Tensor]) -> str:
    """``resnet50`` or ``resnet101``: a reference checkpoint's trunk, told by its number of res4 blocks.

    Raises:
        CheckpointMismatchError: the backbone keys fit neither depth (or are missing).
    """
    blocks = set()
    for key in state:
        m = re.match(r"(?:module\.)?backbone\.(?:res4|layer3)\.(\d+)\.", key)
        if m:
            blocks.add(int(m.group(1)))
    name = _RESNET_BY_RES4_BLOCKS.get(len(blocks))
    if name is None:
        raise CheckpointMismatchError(
            f"cannot tell the backbone: {len(blocks)} res4 blocks (ResNet-50 has 6, ResNet-101 has 23)",
            LoadReport(),
        )
    return name
