"""Stage 2: train Mask Matching on top of a frozen backbone + POS (SPEC §2, §3, §4)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.base import STAGE_KEY, EpisodeModule
from fewshot_seg.lightning.pos_module import POSModule
from fewshot_seg.models.convert import CheckpointMismatchError, load_reference_checkpoint
from fewshot_seg.models.criterion import MaskMatchingCriterion
from fewshot_seg.models.mask_matching import MaskMatching
from fewshot_seg.models.selection import oracle_select, selected_foreground, top_cosine_select

_REF_MM_KEY = re.compile(r"(conv_\d+|crossat_\d+|fc[12])\.")
STAGE1_HPARAMS = (
    "backbone",
    "num_queries",
    "pos_dim",
    "pos_heads",
    "enc_layers",
    "enc_ffn",
    "dec_layers",
    "dec_ffn",
    "norm_groups",
)
"""Backbone/POS architecture settings stage 2 shares with stage 1 (POSModule arguments of the same name)."""


def paper_architecture() -> dict[str, Any]:
    """The paper's backbone/POS settings: POSModule's defaults (one source of truth for both stages)."""
    params = inspect.signature(POSModule.__init__).parameters
    return {k: params[k].default for k in STAGE1_HPARAMS}


class Stage1CheckpointError(ValueError):
    """A stage-1 checkpoint :class:`MMModule` cannot use (wrong stage, wrong shapes, unreadable)."""


def _read(path: str | Path) -> Mapping:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise Stage1CheckpointError(f"stage1_checkpoint {str(path)!r} does not exist") from err
    except Exception as err:  # unpickling errors come in several types
        raise Stage1CheckpointError(
            f"stage1_checkpoint {str(path)!r} is not a readable checkpoint: {err}"
        ) from err
    if not isinstance(ckpt, Mapping):
        raise Stage1CheckpointError(
            f"stage1_checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint"
        )
    return ckpt


def _is_lightning(ckpt: Mapping) -> bool:
    return "state_dict" in ckpt and ("pytorch-lightning_version" in ckpt or STAGE_KEY in ckpt)


def _check_lightning_stage(ckpt: Mapping, path: str) -> None:
    state: Mapping[str, Tensor] = ckpt["state_dict"]
    stage = ckpt.get(STAGE_KEY) or ("mm" if any(k.startswith("mm.") for k in state) else "pos")
    if stage != "pos":
        raise Stage1CheckpointError(
            f"stage1_checkpoint {path!r} is a stage-2 ({stage!r}, MMModule) checkpoint; it expects a "
            "stage-1 POSModule checkpoint. To continue a stage-2 run use --ckpt_path instead."
        )
    if not any(k.startswith("pos.") for k in state):
        raise Stage1CheckpointError(f"stage1_checkpoint {path!r} holds no POS weights (no 'pos.*' keys)")


def resolve_architecture(
    given: Mapping[str, Any], ckpt: Mapping | None = None, path: str = ""
) -> dict[str, Any]:
    """Backbone/POS settings of stage 2: the stage-1 run's, unless none is recorded.

    Args:
        given: the MMModule arguments of :data:`STAGE1_HPARAMS`; None means "not set".
        ckpt: the loaded stage-1 checkpoint, or None.
        path: its path, for messages.

    Returns:
        A value for every setting: from a POSModule checkpoint's saved hyper-parameters where it
        records them, else the given value, else the paper default (reference checkpoints and no
        checkpoint record nothing; their shapes are checked when the weights load).

    Raises:
        Stage1CheckpointError: a given value differs from the one the stage-1 run was trained with
            (the weights could not be used as configured, or would be used under a wrong name).
    """
    recorded: Mapping[str, Any] = {}
    if ckpt is not None and _is_lightning(ckpt):
        recorded = ckpt.get("hyper_parameters") or {}
    paper = paper_architecture()
    arch, conflicts = {}, []
    for k in STAGE1_HPARAMS:
        if k in recorded and recorded[k] is not None:
            arch[k] = recorded[k]
            if given.get(k) is not None and given[k] != recorded[k]:
                conflicts.append(f"{k}: {recorded[k]!r} (checkpoint) vs {given[k]!r} (model)")
        else:
            arch[k] = given[k] if given.get(k) is not None else paper[k]
    if conflicts:
        raise Stage1CheckpointError(
            f"stage1_checkpoint {path!r} was trained with other backbone/POS settings than this model "
            f"sets: {'; '.join(conflicts)}. Leave these settings unset (null): stage 2 takes them "
            "from the stage-1 checkpoint."
        )
    return arch


class MMModule(EpisodeModule):
    """Stage 2: Mask Matching trained on a frozen stage-1 model (backbone + POS, run under ``no_grad``).

    Validation and test report, side by side on the same episodes: the model (merged MM map), the
    oracle (best proposal by soft IoU against the GT) and the heuristic baseline (the proposal with
    the highest cosine similarity to the support prototype, no learnable matching).

    The backbone/POS settings (``backbone``, ``num_queries`` ... ``norm_groups``) default to None =
    "the stage-1 run's": a POSModule checkpoint records them in its hyper-parameters and they are
    taken from there, so they are never repeated by hand; a value set here must equal the recorded
    one (else :class:`Stage1CheckpointError` names the setting). With a reference checkpoint or
    none, None means the paper setting (POSModule's defaults). The resolved values are stored in
    this module's hyper-parameters, so a stage-2 checkpoint is self-describing.

    Args:
        stage1_checkpoint: the stage-1 weights: a ``POSModule`` Lightning checkpoint (stage and
            shapes are checked) or a reference detectron2-style MM-Former state dict (if that one also
            holds Mask Matching weights, e.g. a released stage-2 model, they are loaded too). None
            leaves the POS random (tests only). Read again whenever the module is built, also when
            resuming with ``--ckpt_path`` (whose weights then replace it).
        backbone: torchvision ResNet name.
        backbone_weights: backbone initialisation when no ``stage1_checkpoint`` is given
            (``"imagenet"``, a file, or None); ignored otherwise, as the checkpoint holds the backbone.
        num_queries: N proposals.
        pos_dim: POS width.
        pos_heads: POS attention heads.
        enc_layers: POS encoder layers.
        enc_ffn: POS encoder FFN width.
        dec_layers: POS decoder layers.
        dec_ffn: POS decoder FFN width.
        norm_groups: POS GroupNorm groups.
        mm_dim: Mask Matching width (1x1 reductions, Cross-Alignment).
        mm_heads: Cross-Alignment heads.
        mm_ffn: Cross-Alignment FFN width.
        mm_layers: Cross-Alignment layers.
        matching_hidden: hidden width of the matching MLP (fc1/fc2).
        kv_min_size: short side of the Cross-Alignment keys/values.
        dice_weight: weight of the two-channel dice loss L_M.
        contrastive_weight: weight of the contrastive BCE L_co.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (0 on norms and embeddings).
        poly_power: poly schedule power (stepped per iteration).
        max_steps: schedule length; None = the Trainer's ``max_steps`` (or its estimate).
        eval_class_ids: class ids to score; None = the DataModule's ``novel_classes``.
        predict_dir: where ``predict`` writes masks and overlays; None = ``<run dir>/predictions``.
    """

    stage = "mm"
    frozen_modules = ("backbone", "pos")
    metric_names = ("model", "oracle", "baseline")
    monitor_metric = "val/miou"

    def __init__(
        self,
        stage1_checkpoint: str | None = None,
        backbone: str | None = None,
        backbone_weights: str | None = "imagenet",
        num_queries: int | None = None,
        pos_dim: int | None = None,
        pos_heads: int | None = None,
        enc_layers: int | None = None,
        enc_ffn: int | None = None,
        dec_layers: int | None = None,
        dec_ffn: int | None = None,
        norm_groups: int | None = None,
        mm_dim: int = 256,
        mm_heads: int = 4,
        mm_ffn: int = 512,
        mm_layers: int = 2,
        matching_hidden: int = 500,
        kv_min_size: int = 15,
        dice_weight: float = 10.0,
        contrastive_weight: float = 6.0,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        poly_power: float = 0.9,
        max_steps: int | None = None,
        eval_class_ids: Sequence[int] | None = None,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        path = str(stage1_checkpoint) if stage1_checkpoint else ""
        # Read once: the architecture comes from it before any layer is built.
        ckpt = _read(path) if path else None
        if ckpt is not None and _is_lightning(ckpt):
            _check_lightning_stage(ckpt, path)
        given = {k: self.hparams[k] for k in STAGE1_HPARAMS}
        arch = resolve_architecture(given, ckpt, path)
        # Recorded in the hyper-parameters (hence in stage-2 checkpoints): --ckpt_path and
        # load_from_checkpoint rebuild the same shapes, and the stage-1 file is re-checked against them.
        self.hparams.update(arch)
        self._build_backbone_and_pos(
            arch["backbone"],
            None if ckpt is not None else backbone_weights,
            True,
            arch["num_queries"],
            arch["pos_dim"],
            arch["pos_heads"],
            arch["enc_layers"],
            arch["enc_ffn"],
            arch["dec_layers"],
            arch["dec_ffn"],
            arch["norm_groups"],
        )
        ch = self.backbone.out_channels
        self.mm = MaskMatching(
            in_channels=(ch["res5"], ch["res4"], ch["res3"]),
            hidden_dim=mm_dim,
            nhead=mm_heads,
            dim_feedforward=mm_ffn,
            num_layers=mm_layers,
            num_proposals=arch["num_queries"],
            matching_hidden=matching_hidden,
            kv_min_size=kv_min_size,
        )
        self.criterion = MaskMatchingCriterion(dice_weight=dice_weight, contrastive_weight=contrastive_weight)
        if ckpt is not None:
            self._load_stage1_state(ckpt, path)
        self._freeze_now()

    # ------------------------------------------------------------------ stage-1 weights
    def load_stage1(self, path: str | Path) -> None:
        """Load backbone + POS from a stage-1 checkpoint; :class:`Stage1CheckpointError` names problems.

        The checkpoint must fit this module's (already built) shapes; its recorded settings are
        checked against this module's as at construction.
        """
        ckpt = _read(path)
        if _is_lightning(ckpt):
            _check_lightning_stage(ckpt, str(path))
            resolve_architecture({k: self.hparams[k] for k in STAGE1_HPARAMS}, ckpt, str(path))
        self._load_stage1_state(ckpt, str(path))

    def _load_stage1_state(self, ckpt: Mapping, path: str) -> None:
        if _is_lightning(ckpt):
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
            mine = {k: self.hparams[k] for k in STAGE1_HPARAMS}
            raise Stage1CheckpointError(
                f"stage1_checkpoint {path!r} does not fit this model's backbone/POS shapes: "
                + " | ".join(parts)
                + f". The checkpoint does not record all its settings; this model uses {mine}: set the "
                "model's backbone/POS sizes to those of the stage-1 run."
            )
        self.load_state_dict(theirs, strict=False)

    def _load_reference(self, state: Mapping, path: str) -> None:
        inner = state.get("model", state) if isinstance(state.get("model", None), Mapping) else state
        has_mm = any(_REF_MM_KEY.match(k.removeprefix("module.")) for k in inner)
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

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def proposals_and_features(self, batch: EpisodeBatch) -> tuple[dict, list[dict], Tensor]:
        """Frozen part: query/support backbone features and POS logits (no graph is kept)."""
        b, k = batch.batch_size, batch.shot
        query_feats = self.backbone(batch.query_image)
        logits = self.pos(query_feats)["pred_masks"]
        sup = self.backbone(batch.support_images.flatten(0, 1))  # one pass for all B*K supports
        sup = {name: f.unflatten(0, (b, k)) for name, f in sup.items()}
        support_feats = [{name: f[:, i] for name, f in sup.items()} for i in range(k)]
        return query_feats, support_feats, logits

    def forward(self, batch: EpisodeBatch) -> dict:
        """Mask Matching outputs (``foreground [B, H, W]`` at input size, ``similarity``, ...)."""
        query_feats, support_feats, logits = self.proposals_and_features(batch)
        hw = (batch.query_image.shape[-2], batch.query_image.shape[-1])
        return self.mm(query_feats, support_feats, batch.support_masks, logits.float(), image_size=hw)

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        losses = self.criterion(out, batch.query_mask)
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
