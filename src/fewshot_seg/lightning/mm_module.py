"""Stage 2: train Mask Matching on top of a frozen backbone + POS (SPEC §2, §3, §4)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from torch import Tensor

from fewshot_seg.checkpoints import (
    CheckpointError,
    Stage1CheckpointError,
    check_stage1,
    is_lightning_checkpoint,
    read_checkpoint,
    recorded_hparams,
)
from fewshot_seg.config import (
    BackboneConfig,
    MaskMatchingConfig,
    MMLossConfig,
    OptimizerConfig,
    POSConfig,
    coerce,
    differences,
)
from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.base import EpisodeModule
from fewshot_seg.lightning.finite import StepCheck
from fewshot_seg.lightning.provenance import PROVENANCE_KEY, trained_on
from fewshot_seg.models.build import build_mask_matching, build_mm_criterion
from fewshot_seg.models.convert import CheckpointMismatchError, has_mask_matching, load_reference_checkpoint
from fewshot_seg.models.mm_forward import encode_supports, segment_queries
from fewshot_seg.models.selection import oracle_select, selected_foreground, top_cosine_select


def resolve_architecture(
    backbone: BackboneConfig | None, pos: POSConfig | None, ckpt: Mapping | None, path: str = ""
) -> tuple[BackboneConfig, POSConfig]:
    """The backbone/POS of stage 2: the stage-1 run's, unless none is recorded.

    Args:
        backbone: the backbone given to MMModule, or None (= "the stage-1 run's").
        pos: the POS given to MMModule, or None.
        ckpt: the loaded stage-1 checkpoint, or None.
        path: its path, for messages.

    Returns:
        A POSModule checkpoint's recorded configurations where it records them, else the given ones,
        else the paper's (reference checkpoints and no checkpoint record nothing; their shapes are
        checked when the weights load).

    Raises:
        Stage1CheckpointError: a given configuration differs from the one the stage-1 run was trained
            with (the backbone by its architecture name only: stage 2 always freezes it).
    """
    recorded = recorded_hparams(ckpt)
    rec_backbone = coerce(BackboneConfig, recorded.get("backbone"))
    rec_pos = coerce(POSConfig, recorded.get("pos"))
    conflicts = []
    if backbone is not None and rec_backbone is not None and backbone.name != rec_backbone.name:
        conflicts.append(f"backbone.name: {rec_backbone.name!r} (checkpoint) vs {backbone.name!r} (model)")
    if pos is not None and rec_pos is not None:
        conflicts += [f"pos.{d}" for d in differences(pos, rec_pos)]
    if conflicts:
        raise Stage1CheckpointError(
            f"stage1_checkpoint {path!r} was trained with other backbone/POS settings than this model "
            f"sets: {'; '.join(conflicts)}. Leave `backbone` and `pos` unset (null): stage 2 takes them "
            "from the stage-1 checkpoint."
        )
    resolved_pos = rec_pos or pos or POSConfig()
    if pos is not None and rec_pos is not None:  # the given run-time choices (RUNTIME_FIELDS) win
        resolved_pos = replace(resolved_pos, deform_attn=pos.deform_attn)
    return rec_backbone or backbone or BackboneConfig(), resolved_pos


def _read_stage1(path: str) -> Mapping[str, Any]:
    """The stage-1 checkpoint file; its problems as :class:`Stage1CheckpointError` (cause kept)."""
    try:
        return read_checkpoint(path, "stage1_checkpoint")
    except CheckpointError as err:
        raise Stage1CheckpointError(str(err)) from err


def _without_config(record: Mapping | None) -> dict | None:
    return {k: v for k, v in record.items() if k != "config"} if record else None


class MMModule(EpisodeModule):
    """Stage 2: Mask Matching trained on a frozen stage-1 model (backbone + POS, run under ``no_grad``).

    Validation and test report, side by side on the same episodes: the model (merged MM map), the
    oracle (best proposal by soft IoU against the GT) and the heuristic baseline (the proposal with
    the highest cosine similarity to the support prototype, no learnable matching).

    ``backbone`` and ``pos`` default to None = "the stage-1 run's": a POSModule checkpoint records
    them and they are taken from there, so they are never repeated by hand; one given here must equal
    the recorded one (else :class:`Stage1CheckpointError` names the differing fields). With a reference
    checkpoint or none, None means the paper's. The resolved values are stored in this module's
    hyper-parameters, so a stage-2 checkpoint describes its whole network.

    Args:
        stage1_checkpoint: the stage-1 weights: a ``POSModule`` Lightning checkpoint (stage and shapes
            are checked) or a reference detectron2-style MM-Former state dict (if that one also holds
            Mask Matching weights, e.g. a released stage-2 model, they are loaded too). None leaves the
            POS random (tests only). When it is gone but the architecture is known (a model rebuilt from
            a stage-2 checkpoint for ``test`` / ``predict`` / resuming), the weights must come from
            ``--ckpt_path``.
        backbone: the ResNet trunk; None = the stage-1 run's. Always frozen here; its ``weights`` are
            used only without a ``stage1_checkpoint``.
        pos: the POS sizes; None = the stage-1 run's.
        mm: the Mask Matching head's sizes.
        loss: loss weights.
        optim: optimiser, schedule and global batch (4 episodes per step in the paper).
        eval_class_ids: class ids to score; None = the DataModule's ``novel_classes``.
        predict_dir: where ``predict`` writes masks and overlays; None = ``<run dir>/predictions``.
        overwrite_predictions: let ``predict`` replace the outputs of an earlier run in ``predict_dir``
            (refused by default, before anything is predicted).
        allow_class_overlap: see :class:`~fewshot_seg.lightning.base.EpisodeModule`; here also a stage-1
            model trained on another fold or dataset.
    """

    stage = "mm"
    metric_names = ("model", "oracle", "baseline")
    monitor_metric = "val/miou"
    architecture_hparams = ("backbone", "pos", "mm")

    def __init__(
        self,
        stage1_checkpoint: str | None = None,
        backbone: BackboneConfig | None = None,
        pos: POSConfig | None = None,
        mm: MaskMatchingConfig = MaskMatchingConfig(),
        loss: MMLossConfig = MMLossConfig(),
        optim: OptimizerConfig = OptimizerConfig(batch_size=4),
        eval_class_ids: list[int] | None = None,
        predict_dir: str | None = None,
        overwrite_predictions: bool = False,
        allow_class_overlap: bool = False,
    ) -> None:
        backbone, pos = coerce(BackboneConfig, backbone), coerce(POSConfig, pos)
        mm, loss, optim = (
            coerce(MaskMatchingConfig, mm),
            coerce(MMLossConfig, loss),
            coerce(OptimizerConfig, optim),
        )
        super().__init__(optim, eval_class_ids, predict_dir, allow_class_overlap, overwrite_predictions)
        self.save_hyperparameters(ignore=["predict_dir", "overwrite_predictions"])
        path = str(stage1_checkpoint) if stage1_checkpoint else ""
        # A model rebuilt from a stage-2 checkpoint has its architecture given and its weights coming with
        # that checkpoint: a stage-1 file gone since is provenance only (checked when weights are needed).
        rebuilt = backbone is not None and pos is not None
        self._stage1_missing = path if path and rebuilt and not os.path.exists(path) else ""
        ckpt = _read_stage1(path) if path and not self._stage1_missing else None
        if ckpt is not None and is_lightning_checkpoint(ckpt):
            check_stage1(ckpt, path)
        backbone, pos = resolve_architecture(backbone, pos, ckpt, path)
        # Recorded in the hyper-parameters (hence in stage-2 checkpoints): --ckpt_path and
        # load_from_checkpoint rebuild the same shapes without the stage-1 file.
        # Its weights come from the checkpoint: a model rebuilt from these hyper-parameters (test,
        # predict) must not try to fetch ImageNet weights that --ckpt_path replaces anyway.
        self.hparams.update(backbone=replace(backbone, weights=None) if path else backbone, pos=pos)
        self._hparams_as_dicts()
        self.frozen_modules = ("backbone", "pos")
        self._build_backbone_and_pos(backbone, pos, None if path else backbone.weights, frozen_bn=True)
        self.mm = build_mask_matching(mm, self.backbone.out_channels, pos.num_queries)
        self.criterion = build_mm_criterion(loss)
        self._stage1 = {"checkpoint": path or None, "provenance": ckpt.get(PROVENANCE_KEY) if ckpt else None}
        if ckpt is not None:
            self._load_stage1_state(ckpt, path)
        self._freeze_now()

    # ------------------------------------------------------------------ stage-1 weights
    def _require_trained_weights(self, command: str) -> None:
        if self._stage1_missing and self.weights_from is None:
            raise Stage1CheckpointError(
                f"stage1_checkpoint {self._stage1_missing!r} does not exist, and no --ckpt_path gives "
                f"this model's weights for `{command}`"
            )
        super()._require_trained_weights(command)

    def on_fit_start(self) -> None:
        if self._stage1_missing and self.weights_from is None:
            self._require_trained_weights("fit")
        super().on_fit_start()

    def _prior_training(self) -> dict | None:
        # Resumed: the interrupted fit's record (it includes stage 1's); else the stage-1 model's.
        return trained_on(self._provenance) or trained_on(self._stage1["provenance"])

    def _extra_provenance(self) -> dict[str, Any]:
        stage1 = (self._provenance or {}).get("stage1") or self._stage1
        return {"stage1": {**stage1, "provenance": _without_config(stage1.get("provenance"))}}

    def load_stage1(self, path: str) -> None:
        """Load backbone + POS from a stage-1 checkpoint; :class:`Stage1CheckpointError` names problems.

        The checkpoint must fit this module's (already built) shapes; its recorded settings are
        checked against this module's as at construction.
        """
        ckpt = _read_stage1(path)
        if is_lightning_checkpoint(ckpt):
            check_stage1(ckpt, path)
            resolve_architecture(
                coerce(BackboneConfig, self.hparams["backbone"]),
                coerce(POSConfig, self.hparams["pos"]),
                ckpt,
                path,
            )
        self._load_stage1_state(ckpt, path)

    def _load_stage1_state(self, ckpt: Mapping, path: str) -> None:
        if is_lightning_checkpoint(ckpt):
            self._load_lightning_stage1(ckpt, path)
        else:
            self._load_reference(ckpt, path)

    def _load_lightning_stage1(self, ckpt: Mapping, path: str) -> None:
        state: Mapping[str, Tensor] = ckpt["state_dict"]
        # BatchNorm step counters mean nothing to the frozen backbone (FrozenBatchNorm2d has none).
        theirs = {
            k: v
            for k, v in state.items()
            if k.startswith(("backbone.", "pos.")) and not k.endswith("num_batches_tracked")
        }
        ours = {k: v for k, v in self.state_dict().items() if k.startswith(("backbone.", "pos."))}
        mismatched = [
            f"{k}: checkpoint {list(theirs[k].shape)} vs model {list(v.shape)}"
            for k, v in ours.items()
            if k in theirs and theirs[k].shape != v.shape
        ]
        missing = [k for k in ours if k not in theirs]
        unexpected = [k for k in theirs if k not in ours]
        if mismatched or missing or unexpected:
            # Settings recorded in the checkpoint were taken from it, so this means it records
            # none (or not all): name the keys, and say which sizes to set by hand.
            parts = []
            for title, names in (
                ("shape mismatches", mismatched),
                ("missing in checkpoint", missing),
                ("not in model", unexpected),
            ):
                if names:
                    parts.append(
                        f"{title} ({len(names)}): "
                        + "; ".join(names[:5])
                        + (" ..." if len(names) > 5 else "")
                    )
            raise Stage1CheckpointError(
                f"stage1_checkpoint {path!r} does not fit this model's backbone/POS shapes: "
                + " | ".join(parts)
                + f". The checkpoint does not record all its settings; this model uses backbone "
                f"{self.hparams['backbone']['name']!r} and pos {self.hparams['pos']}: set `backbone` and "
                "`pos` to those of the stage-1 run."
            )
        self.load_state_dict(theirs, strict=False)

    def _load_reference(self, state: Mapping, path: str) -> None:
        inner = state.get("model", state) if isinstance(state.get("model", None), Mapping) else state
        has_mm = has_mask_matching(inner)
        if not any(k.removeprefix("module.").startswith("sem_seg_head.") for k in inner):
            raise Stage1CheckpointError(
                f"stage1_checkpoint {path!r} is neither a POSModule Lightning checkpoint nor a reference "
                "MM-Former state dict (no 'sem_seg_head.*' keys)"
            )
        try:
            load_reference_checkpoint(
                state, backbone=self.backbone, pos=self.pos, mask_matching=self.mm if has_mm else None
            )
        except CheckpointMismatchError as err:
            raise Stage1CheckpointError(
                f"reference checkpoint {path!r} does not fit this model: {err}"
            ) from err
        if has_mm:  # a released stage-2 model: every weight is trained
            self.weights_from = path

    # ------------------------------------------------------------------ forward
    def forward(self, batch: EpisodeBatch) -> dict[str, Any]:
        """Mask Matching outputs (``foreground [B, H, W]`` at input size, ``similarity``, ...).

        The inference path of :class:`fewshot_seg.Segmenter` too (``models.mm_forward``): the backbone and
        POS run frozen, under ``no_grad``.
        """
        supports = encode_supports(self.backbone, self.mm, batch.support_images, batch.support_masks)
        return segment_queries(self.backbone, self.pos, self.mm, batch.query_image, supports)

    def predict_foreground(self, batch: EpisodeBatch) -> Tensor:
        return self(batch)["foreground"].float()

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        # One host sync for both checks: the outputs' and the losses' flags are read together
        # (lightning/finite.py); the criterion keeps a non-finite similarity out of its BCE.
        self.step_check = StepCheck(self)
        losses = self.criterion(out, batch.query_mask)
        self.step_check.losses_ready(losses, extra=out)
        loss = sum(losses.values())
        bs = batch.batch_size
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def evaluate(self, batch: EpisodeBatch) -> dict[str, Tensor]:
        out = self(batch)
        proposals = out["proposals"].float()
        hw = (batch.query_image.shape[-2], batch.query_image.shape[-1])
        oracle_index, _ = oracle_select(proposals, batch.query_mask)
        return {
            "model": out["foreground"].float(),
            "oracle": selected_foreground(proposals, oracle_index, hw),
            "baseline": selected_foreground(proposals, top_cosine_select(out["similarity"]), hw),
        }
