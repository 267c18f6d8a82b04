"""``test`` under 2-process DDP (CPU, gloo) gives exactly the single-process metrics.

Through the real CLI: a tiny stage-1 and stage-2 model are trained in-process, then the same stage-2
checkpoint is tested once in this process and once with ``--trainer.strategy=ddp
--trainer.devices=2`` (a subprocess, as DDP launches a copy of the command per rank). The episode
count is odd (7), so equal shards would need a padding duplicate: the test sampler must split the
list without one, and FewShotIoU sums the states of both processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import STAGE1, STAGE2, run_dir_args, run_two_processes, tiny_data

from fewshot_seg.cli import main

EPISODES = 7  # odd: 2 processes get 4 + 3 episodes; a padded sampler would add one repeated episode
COMPARED = (
    "miou",
    "fbiou",
    "oracle_miou",
    "oracle_fbiou",
    "baseline_miou",
    "baseline_fbiou",
    "class_iou",
    "oracle_class_iou",
    "baseline_class_iou",
    "class_episodes",
)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _wandb_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _data(root: Path) -> list[str]:
    # Batch 1 at test: each episode then goes through exactly the same computation in both runs
    # (a different batching could change float rounding, which is not what this test is about).
    return [
        *tiny_data(root),
        f"--data.init_args.test_episodes={EPISODES}",
        "--data.init_args.eval_batch_size=1",
    ]


def _fit(args: list[str]) -> Path:
    cli = main(["fit", *args, "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    assert cli.trainer.global_step == 1
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def _decisive_proposals(ckpt: Path) -> Path:
    """The stage-1 checkpoint with its mask-embedding output scaled by -30, saved next to it.

    A POS trained for a step proposes background everywhere (all sigmoids under 0.5), so every
    per-class IoU would be 0 and comparing them would prove nothing; scaled logits give proposals
    with real foreground, hence non-zero oracle and baseline IoUs per class.
    """
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for k in ("weight", "bias"):
        state["state_dict"][f"pos.transformer_decoder.mask_embed.layers.2.{k}"] *= -30.0
    out = ckpt.with_name("decisive.ckpt")
    torch.save(state, out)
    return out


def test_ddp_test_matches_single_process(synthetic_root: Path, tmp_path: Path) -> None:
    root = synthetic_root
    s1 = _fit(
        [
            *STAGE1,
            *_data(root),
            *run_dir_args(tmp_path / "s1", "s1"),
            "--trainer.limit_val_batches=1",
            "--model.init_args.loss.num_points=256",
        ]
    )
    s1 = _decisive_proposals(s1)
    s2 = _fit(
        [
            *STAGE2,
            *_data(root),
            *run_dir_args(tmp_path / "s2", "s2"),
            "--trainer.limit_val_batches=1",
            f"--model.init_args.stage1_checkpoint={s1}",
        ]
    )
    test_args = [
        "test",
        *STAGE2,
        *_data(root),
        f"--model.init_args.stage1_checkpoint={s1}",
        f"--ckpt_path={s2}",
    ]

    main([*test_args, *run_dir_args(tmp_path / "single", "t")])
    single = json.loads((tmp_path / "single" / "fewshot-seg" / "t" / "results.json").read_text())

    ddp = [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
    ]
    # One intra-op thread per rank (run_two_processes): as this process (conftest), 2 ranks on 2 cores.
    run_two_processes([*test_args, *run_dir_args(tmp_path / "ddp", "t"), *ddp], tmp_path)
    multi = json.loads((tmp_path / "ddp" / "fewshot-seg" / "t" / "results.json").read_text())

    # Every episode scored exactly once, in both runs; the per-class numbers are not all 0.
    assert sum(single["class_episodes"].values()) == EPISODES
    assert single["oracle_miou"] > 0 and single["baseline_miou"] > 0 and single["fbiou"] > 0
    for key in COMPARED:
        assert multi[key] == single[key], key
