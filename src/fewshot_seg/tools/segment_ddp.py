"""``fewshot-seg segment --devices N [--num-nodes M]``: the class flow through Lightning's predict loop (DDP).

Every rank runs the same command (Lightning starts the other ranks of a node by re-running it; under
``torchrun`` or SLURM the launcher has started them): each reads and checks the supports before the
process group exists, so a bad input stops every rank with the same one line. Then, per rank:

* ``setup``: rank 0 folds a killed run's record lines into ``annotations.json`` (resume); after a
  barrier, every rank computes the same pending list and takes its share ``pending[rank::world]``:
  disjoint and complete, so each query is segmented by exactly one rank, without the padding repeats of
  a ``DistributedSampler`` (hence ``use_distributed_sampler=False``);
* ``on_predict_start``: the supports are encoded once, on the rank's device;
* ``predict_step``: a batch read and labelled (``segment_classes.segment_batch``), written by a
  ``BasePredictionWriter`` with ``write_interval="batch"`` into the rank's own record file;
* after the loop (not in its end hook, which a rank with an empty share skips), a barrier, and rank 0
  folds every rank's records into ``manifest.csv`` and ``annotations.json`` (``segment_record.finish``);
  the exit status is broadcast to every rank.

docs/distributed.md shows the SLURM and torchrun launches.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from fewshot_seg.multiclass import ClassExamples, EncodedClasses, check_at_model_size
from fewshot_seg.segmenter import Segmenter
from fewshot_seg.tools.common import ToolError, load_segmenter
from fewshot_seg.tools.segment import Query
from fewshot_seg.tools.segment_classes import ClassOutputs, Item, segment_batch
from fewshot_seg.tools.segment_record import PartWriter, RunSummary, finish, fold_leftovers, pending


class ClassSegmentModule(LightningModule):
    """The Segmenter's networks as a LightningModule whose predict step labels a batch of queries."""

    def __init__(
        self,
        segmenter: Segmenter,
        examples: ClassExamples,
        queries: list[Query],
        out: Path,
        coco: bool,
        overwrite: bool,
        batch_size: int | None,
    ) -> None:
        super().__init__()
        # Registered here so that Lightning moves them to the rank's device; the Segmenter uses them.
        self.backbone, self.pos, self.mask_matching = (
            segmenter.backbone,
            segmenter.pos,
            segmenter.mask_matching,
        )
        self.segmenter = segmenter
        self.examples, self.queries, self.out = examples, queries, out
        self.coco, self.overwrite, self.batch_size = coco, overwrite, batch_size
        self.share: list[Query] = []
        self.classes: EncodedClasses | None = None

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if self.trainer.is_global_zero:
            fold_leftovers(self.out, self.examples.names, self.coco)
        strategy.barrier("segment-resume")  # every rank reads the same annotations.json below
        todo = pending(self.queries, self.out, self.examples.names, self.coco, self.overwrite)
        self.share = todo[self.trainer.global_rank :: self.trainer.world_size]
        self.segmenter.device = strategy.root_device  # its default batch size and its tensors follow it

    def predict_dataloader(self) -> DataLoader:
        size = self.batch_size or self.segmenter.default_batch_size
        batches = [self.share[i : i + size] for i in range(0, len(self.share), size)]
        # Lightning refuses a rank whose loader is empty; one empty batch keeps it in step, writing nothing
        # (padding with a repeated query would write that query twice).
        return DataLoader(batches or [[]], batch_size=None, shuffle=False, collate_fn=_as_is)  # type: ignore[arg-type]

    def on_predict_start(self) -> None:
        self.classes = self.segmenter.encode_classes(self.examples)  # once per rank, on its device

    def predict_step(self, batch: list[Query], batch_idx: int) -> list[Item]:
        assert self.classes is not None
        return segment_batch(self.segmenter, self.classes, batch)


def _as_is(batch: list[Query]) -> list[Query]:
    """The loader's items are whole batches of queries, built by ``predict_dataloader``."""
    return batch


class ClassPredictionWriter(BasePredictionWriter):
    """Writes each batch as it comes: label PNGs, overlays, the rank's record lines."""

    def __init__(self, args: argparse.Namespace, out: Path, names: list[str], coco: bool) -> None:
        super().__init__(write_interval="batch")
        self.args, self.out, self.names, self.coco = args, out, names, coco
        self.outputs: ClassOutputs | None = None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self.outputs is None:
            # Opened at the first batch, not in ``setup``: Lightning sets callbacks up before the module,
            # whose setup folds (and removes) a killed run's record files on rank 0.
            part = PartWriter(self.out, trainer.global_rank)
            self.outputs = ClassOutputs(self.names, part, self.args.overlay, self.coco, self.args.instances)
        self.outputs.write_batch(prediction)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.outputs is not None:
            self.outputs.part.close()


def accelerator(device: str) -> str:
    """``--device`` as a Lightning accelerator: auto, cpu, or gpu for cuda."""
    return "gpu" if device.startswith("cuda") else device


def run_distributed(
    args: argparse.Namespace, out: Path, queries: list[Query], examples: ClassExamples, coco: bool
) -> tuple[RunSummary | None, int]:
    """Label ``queries`` with ``--devices`` x ``--num-nodes`` processes.

    Returns:
        (the summary on rank 0, None elsewhere; the exit status, the same on every rank: 1 if a query
        failed, else 0).
    """
    if accelerator(args.device) == "gpu" and not torch.cuda.is_available():
        raise ToolError(f"--device {args.device} but no CUDA device is available here; use cpu or auto")
    # Built on the CPU; Lightning moves the networks to each rank's device before the supports are encoded.
    segmenter = load_segmenter(argparse.Namespace(**{**vars(args), "device": "cpu"}))
    check_at_model_size(examples, segmenter.image_size)  # before any rank starts: one line, every rank
    module = ClassSegmentModule(segmenter, examples, queries, out, coco, args.overwrite, args.batch_size)
    writer = ClassPredictionWriter(args, out, examples.names, coco)
    processes = args.devices * args.num_nodes
    trainer = Trainer(
        accelerator=accelerator(args.device),
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy="ddp" if processes > 1 else "auto",
        use_distributed_sampler=False,  # each rank takes its own share (ClassSegmentModule.setup)
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[writer],
        default_root_dir=out,
    )
    trainer.predict(module, return_predictions=False)
    # After the loop, not in its end hook: a rank with an empty share skips the loop's hooks. The process
    # group outlives trainer.predict (DDPStrategy.teardown does not destroy it).
    strategy = trainer.strategy
    strategy.barrier("segment-merge")  # every rank's record lines are complete
    summary = finish(out, queries, examples.names, coco) if trainer.is_global_zero else None
    status = strategy.broadcast(1 if summary is not None and summary.failed else 0, src=0)
    return summary, int(status)


__all__ = ["ClassPredictionWriter", "ClassSegmentModule", "run_distributed"]
