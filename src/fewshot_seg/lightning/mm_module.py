"""Stage 2: train Mask Matching on top of a frozen backbone + POS (SPEC §2, §3, §4)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.base import STAGE_KEY, EpisodeModule
from fewshot_seg.models.convert import CheckpointMismatchError, load_reference_checkpoint
from fewshot_seg.models.criterion import MaskMatchingCriterion
from fewshot_seg.models.mask_matching import MaskMatching
from fewshot_seg.models.selection import oracle_select, selected_foreground, top_cosine_select

_REF_MM_KEY = re.compile(r"(conv_\d+|crossat_\d+|fc[12])\.")
_STAGE1_HPARAMS = (
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


class Stage1CheckpointError(ValueError):
    """A stage-1 checkpoint :class:`MMModule` cannot use (wrong stage, wrong shapes, unreadable)."""


def _read(path: str | Path) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise Stage1CheckpointError(f"stage1_checkpoint {str(path)!r} does not exist") from err
    except Exception as err:  # unpickling errors come in several types
        raise Stage1CheckpointError(
            f"stage1_checkpoint {str(path)!r} is not a readable checkpoint: {err}"
        ) from err


class MMModule(EpisodeModule):
    """Stage 2: Mask Matching trained on a frozen stage-1 model (backbone + POS, run under ``no_grad``).

    Validation and test report, side by side on the same episodes: the model (merged MM map), the
    oracle (best proposal by soft IoU against the GT) and the heuristic baseline (the proposal with
    the highest cosine similarity to the support prototype, no learnable matching).

    Args:
        stage1_checkpoint: the stage-1 weights: a ``POSModule`` Lightning checkpoint (stage and
            shapes are checked) or a reference detectron2-style MM-Former state dict (if that one also
            holds Mask Matching weights, e.g. a released stage-2 model, they are loaded too). None
            leaves the POS random (tests only). Read again whenever the module is built, also when
            resuming with ``--ckpt_path`` (whose weights then replace it).
        backbone: torchvision ResNet name; must match the stage-1 run.
        backbone_weights: backbone initialisation when no ``stage1_checkpoint`` is given
            (``"imagenet"``, a file, or None); ignored otherwise, as the checkpoint holds the backbone.
        num_queries: N proposals (must match stage 1).
        pos_dim: POS width (must match stage 1).
        pos_heads: POS attention heads (must match stage 1).
        enc_layers: POS encoder layers (must match stage 1).
        enc_ffn: POS encoder FFN width (must match stage 1).
        dec_layers: POS decoder layers (must match stage 1).
        dec_ffn: POS decoder FFN width (must match stage 1).
        norm_groups: POS GroupNorm groups (must match stage 1).
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
        backbone: str = "resnet50",
        backbone_weights: str | None = "imagenet",
        num_queries: int = 100,
        pos_dim: int = 256,
        pos_heads: int = 8,
        enc_layers: int = 6,
        enc_ffn: int = 1024,
        dec_layers: int = 9,
        dec_ffn: int = 2048,
        norm_groups: int = 32,
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
        self._build_backbone_and_pos(
            backbone,
            None if stage1_checkpoint else backbone_weights,
            True,
            num_queries,
            pos_dim,
            pos_heads,
            enc_layers,
            enc_ffn,
            dec_layers,
            dec_ffn,
            norm_groups,
        )
        ch = self.backbone.out_channels
        self.mm = MaskMatching(
            in_channels=(ch["res5"], ch["res4"], ch["res3"]),
            hidden_dim=mm_dim,
            nhead=mm_heads,
            dim_feedforward=mm_ffn,
            num_layers=mm_layers,
            num_proposals=num_queries,
            matching_hidden=matching_hidden,
            kv_min_size=kv_min_size,
        )
        self.criterion = MaskMatchingCriterion(dice_weight=dice_weight, contrastive_weight=contrastive_weight)
        if stage1_checkpoint:
            self.load_stage1(stage1_checkpoint)
        self._freeze_now()

    # ------------------------------------------------------------------ stage-1 weights
    def load_stage1(self, path: str | Path) -> None:
        """Load backbone + POS from a stage-1 checkpoint; :class:`Stage1CheckpointError` names problems."""
        ckpt = _read(path)
        if not isinstance(ckpt, Mapping):
            raise Stage1CheckpointError(
                f"stage1_checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a checkpoint"
            )
        if "state_dict" in ckpt and ("pytorch-lightning_version" in ckpt or STAGE_KEY in ckpt):
            self._load_lightning_stage1(ckpt, str(path))
        else:
            self._load_reference(ckpt, str(path))

    def _load_lightning_stage1(self, ckpt: Mapping, path: str) -> None:
        state: Mapping[str, Tensor] = ckpt["state_dict"]
        stage = ckpt.get(STAGE_KEY) or ("mm" if any(k.startswith("mm.") for k in state) else "pos")
        if stage != "pos":
            raise Stage1CheckpointError(
                f"stage1_checkpoint {path!r} is a stage-2 ({stage!r}, MMModule) checkpoint; it expects a "
                "stage-1 POSModule checkpoint. To continue a stage-2 run use --ckpt_path instead."
            )
        if not any(k.startswith("pos.") for k in state):
            raise Stage1CheckpointError(f"stage1_checkpoint {path!r} holds no POS weights (no 'pos.*' keys)")
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
            hp = ckpt.get("hyper_parameters", {}) or {}
            trained = {k: hp[k] for k in _STAGE1_HPARAMS if k in hp}
            mine = {k: self.hparams[k] for k in _STAGE1_HPARAMS}
            diff = {
                k: f"{trained[k]} (checkpoint) vs {mine[k]} (model)" for k in trained if trained[k] != mine[k]
            }
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
            hint = (
                f" Differing settings: {diff}. Set the same values in the model's init_args."
                if diff
                else " Set the model's backbone/POS sizes to those of the stage-1 run."
            )
            raise Stage1CheckpointError(
                f"stage1_checkpoint {path!r} does not fit this model's backbone/POS shapes: "
                + " | ".join(parts)
                + "."
                + hint
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
