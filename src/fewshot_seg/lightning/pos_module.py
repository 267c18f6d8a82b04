"""Stage 1: train the Potential Objects Segmenter (POS) on base-class episodes (SPEC §3, §4)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fewshot_seg.episode import EpisodeBatch
from fewshot_seg.lightning.base import EpisodeModule
from fewshot_seg.models.criterion import POSCriterion, semantic_to_targets
from fewshot_seg.models.selection import oracle_select, selected_foreground


class POSModule(EpisodeModule):
    """Stage 1: backbone -> POS, trained with the Mask2Former-style set loss plus the few-shot term.

    Validation and test score the *oracle* (the proposal with the best soft IoU against the query
    ground truth, SPEC §6) on the novel classes: an upper bound that tells how good the proposals are.

    Args:
        backbone: torchvision ResNet name (resnet18/34/50/101).
        backbone_weights: ``"imagenet"`` (torchvision IMAGENET1K_V1, needs the weights cached or
            network), a local weights file, or None (random init).
        freeze_backbone: no gradients and frozen BatchNorm statistics in the backbone (paper). Set
            False only when there are no pretrained weights (e.g. the CPU demo with resnet18).
        frozen_bn: backbone norm layers as ``FrozenBatchNorm2d`` (fixed statistics and affine, as
            detectron2) instead of ``nn.BatchNorm2d``. None = the same as ``freeze_backbone``. With
            ``freeze_backbone=True, frozen_bn=False`` the backbone keeps real BatchNorm layers whose
            statistics stay fixed only because the freezing callback holds them in eval mode.
        backbone_lr_mult: learning-rate multiplier of a trainable backbone.
        num_queries: N proposals.
        pos_dim: width of the pixel decoder, mask features and transformer decoder.
        pos_heads: attention heads of encoder and decoder.
        enc_layers: deformable encoder layers of the pixel decoder.
        enc_ffn: FFN width of the encoder.
        dec_layers: masked-attention decoder layers.
        dec_ffn: FFN width of the decoder.
        norm_groups: GroupNorm groups of the pixel decoder.
        mask_weight: weight of the point BCE mask loss.
        dice_weight: weight of the point dice loss.
        fewshot_weight: weight of the few-shot dice term on the best proposal.
        num_points: points per mask for matching and losses (12,544 in the paper).
        oversample_ratio: PointRend oversampling.
        importance_sample_ratio: share of uncertain points.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (0 on norms and embeddings).
        poly_power: poly schedule power (stepped per iteration).
        max_steps: schedule length; None = the Trainer's ``max_steps`` (or its estimate).
        eval_class_ids: class ids to score; None = the DataModule's ``novel_classes``.
        predict_dir: where ``predict`` writes masks and overlays; None = ``<run dir>/predictions``.
    """

    stage = "pos"
    metric_names = ("oracle",)
    monitor_metric = "val/oracle_miou"

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_weights: str | None = "imagenet",
        freeze_backbone: bool = True,
        frozen_bn: bool | None = None,
        backbone_lr_mult: float = 0.1,
        num_queries: int = 100,
        pos_dim: int = 256,
        pos_heads: int = 8,
        enc_layers: int = 6,
        enc_ffn: int = 1024,
        dec_layers: int = 9,
        dec_ffn: int = 2048,
        norm_groups: int = 32,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        fewshot_weight: float = 10.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        poly_power: float = 0.9,
        max_steps: int | None = None,
        eval_class_ids: Sequence[int] | None = None,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.frozen_modules = ("backbone",) if freeze_backbone else ()
        # Default: FrozenBatchNorm2d for a frozen backbone, trainable BatchNorm otherwise.
        self._build_backbone_and_pos(
            backbone,
            backbone_weights,
            freeze_backbone if frozen_bn is None else frozen_bn,
            num_queries,
            pos_dim,
            pos_heads,
            enc_layers,
            enc_ffn,
            dec_layers,
            dec_ffn,
            norm_groups,
        )
        self.criterion = POSCriterion(
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            fewshot_weight=fewshot_weight,
            num_points=num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
        )
        self._freeze_now()

    def forward(self, images: Tensor) -> dict:
        """POS outputs (mask logits on the padded stride-4 grid) for normalised images."""
        return self.pos(self.backbone_features(images))

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        out = self(batch.query_image)
        targets = [semantic_to_targets(s) for s in batch.query_semantic]
        losses = self.criterion(out, targets, batch.query_mask)
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
        out = self(batch.query_image)
        proposals = out["pred_masks"].float().sigmoid()
        index, _ = oracle_select(proposals, batch.query_mask)
        hw = (batch.query_image.shape[-2], batch.query_image.shape[-1])
        return {"oracle": selected_foreground(proposals, index, hw)}
