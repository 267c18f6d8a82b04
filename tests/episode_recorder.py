"""A callback the DDP tests add through the CLI: every episode each rank trains and validates on."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl


class EpisodeRecorder(pl.Callback):
    """Writes ``<out>/rank<r>.json``: per training and validation batch, its (query, class, supports)."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.rows: list[dict] = []

    def _record(self, trainer: pl.Trainer, split: str, batch) -> None:
        episodes = [
            [q, int(c), list(s)]
            for q, c, s in zip(batch.query_id, batch.class_id.tolist(), batch.support_ids)
        ]
        self.rows.append(
            {
                "split": split,
                "rank": trainer.global_rank,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "episodes": episodes,
            }
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record(trainer, "train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, "val", batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
