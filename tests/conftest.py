"""Test-wide settings: no network, no W&B, deterministic and light on the 2-core CI machine."""

from __future__ import annotations

import os

# Set before anything imports wandb or Lightning: tests never talk to a server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PL_DISABLE_FORK", "1")

import pytest
import torch

# One intra-op thread keeps numerics reproducible (the golden vectors were recorded single-threaded)
# and avoids oversubscription when DataLoader workers run beside the main process.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
