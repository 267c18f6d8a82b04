"""Stage 1: train the Potential Objects Segmenter (POS) on base-class episodes (SPEC §3, §4)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from fewshot_seg.config import BackboneConfig, OptimizerConfig, POSConfig, POSLossConfig, coerce
from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.base import EpisodeModule
from fewshot_seg.lightning.finite import StepCheck, finite_flags
from fewshot_seg.models.backbone import frozen_parts
from fewshot_seg.models.build import build_pos_criterion
from fewshot_seg.models.selection import oracle_select, selected_foreground
from fewshot_seg.models.targets import PaddedTargets, label_values


class POSModule(EpisodeModule):
    """Stage 1: backbone -> POS, trained with the Mask2Former-style set loss plus the few-shot term.

    Validation and test score the *oracle* (the proposal with the best soft IoU against the query
    ground truth, SPEC §6) on the novel classes: an upper bound that tells how good the proposals are.
    Defaults are the paper's (``fewshot_seg.config``).

    Args:
        backbone: the ResNet trunk, its weights and whether it is frozen (the paper) or trained.
        pos: the Potential Objects Segmenter's sizes.
        loss: loss weights and point sampling.
        optim: optimiser, schedule and global batch (8 episodes per step in the paper).
        eval_class_ids: class ids to score; None = the DataModule's ``novel_classes``.
        predict_dir: where ``predict`` writes masks and overlays; None = ``<run dir>/predictions``.
        overwrite_predictions: let ``predict`` replace the outputs of an earlier run in ``predict_dir``
            (refused by default, before anything is predicted).
        allow_class_overlap: see :class:`~fewshot_seg.lightning.base.EpisodeModule`.
    """

    stage = "pos"
    trains_with_supports = False  # the POS trains on the query alone: its training episodes carry none
    metric_names = ("oracle",)
    monitor_metric = "val/oracle_miou"

    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        pos: POSConfig = POSConfig(),
        loss: POSLossConfig = POSLossConfig(),
        optim: OptimizerConfig = OptimizerConfig(batch_size=8),
        eval_class_ids: list[int] | None = None,
        predict_dir: str | None = None,
        overwrite_predictions: bool = False,
        allow_class_overlap: bool = False,
    ) -> None:
        backbone, pos = coerce(BackboneConfig, backbone), coerce(POSConfig, pos)
        loss, optim = coerce(POSLossConfig, loss), coerce(OptimizerConfig, optim)
        super().__init__(optim, eval_class_ids, predict_dir, allow_class_overlap, overwrite_predictions)
        self.save_hyperparameters(ignore=["predict_dir", "overwrite_predictions"])
        self._hparams_as_dicts()
        self.backbone_config = backbone
        self._build_backbone_and_pos(backbone, pos, backbone.weights, backbone.uses_frozen_bn)
        # The pretrained part only: a ViT's feature pyramid is new and trains with the POS.
        self.frozen_modules = frozen_parts(self.backbone) if backbone.freeze else ()
        self.criterion = build_pos_criterion(loss)
        self._freeze_now()

    def forward(self, batch: EpisodeBatch) -> dict:
        """POS outputs of the batch's queries: ``pred_masks [B, N, Hp/4, Wp/4]`` logits (+ ``aux_outputs``).

        Both stage modules take an :class:`EpisodeBatch` (stage 1 reads only its queries).
        """
        return self.pos(self.backbone_features(batch.query_image))

    def point_generator(self) -> torch.Generator:
        """The random source of this step's point sampling: a function of (run seed, step, rank).

        Not the global RNG, whose state a resumed run does not have: a fit stopped and resumed draws
        the same points as an uninterrupted one. The run seed is ``seed_everything``'s (``PL_GLOBAL_SEED``).
        """
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        state = np.random.SeedSequence([seed, self.global_step, self.global_rank]).generate_state(
            1, np.uint64
        )[0]
        return torch.Generator(device=self.device).manual_seed(int(state))

    def training_targets(self, batch: EpisodeBatch) -> PaddedTargets:
        """The query's target masks: built on the device from the label values the collate function read
        on the host; a batch without them (not collated by ``collate_episodes``) reads them here."""
        values = batch.query_label_values
        if values is None:
            values = label_values(batch.query_semantic.cpu())  # a host sync: only for hand-made batches
        return PaddedTargets.from_semantic(batch.query_semantic, values)

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        out = self(batch)
        # Host syncs of the step: the outputs' finiteness flags travel with the matcher's costs (the one
        # device-to-host copy of the losses); the loss flags are read once (lightning/finite.py).
        self.step_check = StepCheck(self)
        names, flags = finite_flags(out)
        losses, details = self.criterion.compute(
            out,
            self.training_targets(batch),
            batch.query_mask,
            generator=self.point_generator(),
            sync_with=flags,
        )
        self.step_check.outputs_read(names, details["synced"])
        self.step_check.losses_ready(losses)
        loss = sum(losses.values())
        bs = batch.batch_size
        # The final-layer terms and the total; the 2 x 9 auxiliary terms would only clutter the logs.
        main = {
            f"train/{k}": v.detach()
            for k, v in losses.items()
            if k in ("loss_mask", "loss_dice", "loss_fewshot")
        }
        self.log_dict(main, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def evaluate(self, batch: EpisodeBatch) -> dict[str, Tensor]:
        out = self(batch)
        proposals = out["pred_masks"].float().sigmoid()
        index, _ = oracle_select(proposals, batch.query_mask)
        hw = (batch.query_image.shape[-2], batch.query_image.shape[-1])
        return {"oracle": selected_foreground(proposals, index, hw)}
