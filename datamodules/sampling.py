"""Which training episodes a process draws: keys by (batch number, rank), and the loader Lightning resumes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, DistributedSampler

TrainPosition = Callable[[], tuple[int, int, int]]
"""Returns ``(batches done, rank, world size)`` of the running fit; read when an epoch starts."""


class TrainStepSampler(DistributedSampler):
    """Keys of the training episodes of this process: a function of (batch number, rank) only.

    Batch ``t`` of rank ``r`` among ``W`` processes holds the global episode keys
    ``(t * W + r) * b ... (t * W + r) * b + b - 1`` (``b`` = per-process batch), so

    * every process draws different episodes, and every batch new ones;
    * the episodes of optimisation step ``s`` over all processes are the keys
      ``[s * G, (s + 1) * G)`` of the global batch ``G = b * W * accumulation``, whatever ``W``;
    * the position comes from the Trainer (``position()`` when an epoch starts, after a checkpoint
      is restored), so a resumed fit continues exactly where the interrupted one stopped.

    A ``DistributedSampler`` only in type, so that Lightning keeps it under DDP instead of wrapping it
    in its own (which would split each batch again and replay epochs).

    Args:
        batch_size: keys per batch of this process.
        batches: batches per epoch (an epoch is only Lightning's bookkeeping here).
        position: ``() -> (batches done, rank, world size)``.
    """

    def __init__(self, batch_size: int, batches: int, position: TrainPosition) -> None:
        self.batch_size = batch_size
        self.batches = batches
        self.position = position

    def set_epoch(self, epoch: int) -> None:
        """Nothing: the position follows the Trainer's step count, not the epoch."""

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        start, rank, world = self.position()
        for t in range(start, start + self.batches):
            first = (t * world + rank) * self.batch_size
            yield from range(first, first + self.batch_size)


class TrainLoader(DataLoader):
    """The training DataLoader; stateful for Lightning because its position is the Trainer's step.

    Lightning warns that a fit resumed mid-epoch may replay data unless the loader can be resumed.
    :class:`TrainStepSampler` derives every batch from the restored step count, so there is no
    iterator state to save.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore (see the class docstring)."""
