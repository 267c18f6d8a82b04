"""DDP *training* on 2 CPU processes (gloo): the right episodes per rank and epoch, validation counted once,
and an exact resume. Slow: every run is a real ``fewshot-seg fit`` launched as 2 processes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_helpers import GEN, STAGE1, run_dir_args, run_two_processes, tiny_data

from datamodules import SyntheticDataModule
from fewshot_seg.cli import main

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
VAL = 5  # odd: 2 processes get 3 + 2 validation episodes, a padded sampler would repeat one


def _args(root: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        *STAGE1,
        *tiny_data(root),
        "--data.init_args.batch_size=null",  # the model's global batch over the processes
        "--model.init_args.optim.batch_size=4",
        f"--model.init_args.optim.max_steps={2 * 2}",  # the whole run's schedule
        "--data.init_args.train_episodes=8",  # 2 steps of 4 episodes per epoch
        f"--data.init_args.val_episodes={VAL}",
        "--model.init_args.loss.num_points=256",
        f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=2",
        *run_dir_args(out, "run"),
        *extra,
    ]


def _ddp(args: list[str], cwd: Path) -> None:
    ddp = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    run_two_processes([*args, *ddp], cwd, pythonpath=TESTS)


def _recorder(out: Path) -> list[str]:
    return ["--trainer.callbacks+=episode_recorder.EpisodeRecorder", f"--trainer.callbacks.out={out}"]


def _episodes(rows: list[dict], split: str) -> dict[tuple[int, int], list]:
    """(epoch, step) -> the episodes every process drew at that step (rank-tagged)."""
    out: dict[tuple[int, int], list] = {}
    for r in rows:
        if r["split"] == split:
            out.setdefault((r["epoch"], r["step"]), []).extend(
                (r["rank"], tuple(map(json.dumps, e))) for e in r["episodes"]
            )
    return out


def test_ddp_training_episodes_and_validation(synthetic_root: Path, tmp_path: Path) -> None:
    _ddp(_args(synthetic_root, tmp_path / "ddp", 4, *_recorder(tmp_path / "rec")), tmp_path)
    rows = [r for k in (0, 1) for r in json.loads((tmp_path / "rec" / f"rank{k}.json").read_text())]
    train = _episodes(rows, "train")
    assert sorted(train) == [(0, 0), (0, 1), (1, 2), (1, 3)]  # 4 steps over 2 epochs
    for step, drawn in train.items():
        ranks = [{e for r, e in drawn if r == k} for k in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 2 and not ranks[0] & ranks[1], step  # ranks disjoint
    epoch0 = {e for (ep, _), d in train.items() if ep == 0 for _, e in d}
    epoch1 = {e for (ep, _), d in train.items() if ep == 1 for _, e in d}
    assert not epoch0 & epoch1  # every epoch draws new episodes

    # The union over the 2 ranks at every step is what one process with the whole global batch draws.
    single = main(
        [*_args(synthetic_root, tmp_path / "one", 4, *_recorder(tmp_path / "rec1")), "--trainer.devices=1"]
    )
    assert single.trainer.global_step == 4
    one = _episodes(json.loads((tmp_path / "rec1" / "rank0.json").read_text()), "train")
    for step, drawn in train.items():
        assert Counter(e for _, e in drawn) == Counter(e for _, e in one[step]), step

    # Validation during the DDP fit: every listed episode exactly once per validation (no padding).
    dm = SyntheticDataModule(
        root=str(synthetic_root), image_size=64, val_episodes=VAL, pool_min_pixels=50, **GEN
    )
    listed = Counter(json.dumps([q, c, s[:1]]) for q, c, s in dm.episode_list("val"))
    for step in (2, 4):
        seen = [e for r in rows if r["split"] == "val" and r["step"] == step for e in r["episodes"]]
        assert Counter(json.dumps(e) for e in seen) == listed, step


def test_ddp_resume_is_bit_identical(synthetic_root: Path, tmp_path: Path) -> None:
    _ddp(_args(synthetic_root, tmp_path / "whole", 4), tmp_path)
    _ddp(_args(synthetic_root, tmp_path / "split", 2), tmp_path)
    _ddp(_args(synthetic_root, tmp_path / "split", 4, "--ckpt_path=last"), tmp_path)
    states = [
        torch.load(
            tmp_path / d / "fewshot-seg" / "run" / "checkpoints" / "last.ckpt",
            map_location="cpu",
            weights_only=True,
        )
        for d in ("whole", "split")
    ]
    assert states[0]["global_step"] == states[1]["global_step"] == 4
    different = [
        k for k, v in states[0]["state_dict"].items() if not torch.equal(v, states[1]["state_dict"][k])
    ]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
