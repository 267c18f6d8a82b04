"""Stage 1 trains on the query alone: its training episodes read no support, whatever the shot."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import STAGE1, run_dir_args, tiny_data

from datamodules import LVIS92iDataModule, SyntheticDataModule
from datamodules.fake import make_fake_lvis
from fewshot_seg.cli import main
from fewshot_seg.episode import collate_episodes

POS_LIKE = SimpleNamespace(trains_with_supports=False)  # what POSModule says (contracts.SupportsModel)
MM_LIKE = SimpleNamespace(trains_with_supports=True)


def _attach(dm, model) -> None:
    dm.trainer = SimpleNamespace(
        lightning_module=model, world_size=1, accumulate_grad_batches=1, global_step=0
    )


def _counting(ds) -> list[str]:
    calls: list[str] = []
    load = ds.source.load
    ds.source.load = lambda image_id, *a, **k: calls.append(image_id) or load(image_id, *a, **k)
    return calls


def test_stage1_loaders_read_one_image_per_episode(synthetic_root: Path) -> None:
    from cli_helpers import GEN

    dm = SyntheticDataModule(root=str(synthetic_root), **GEN, shot=2, image_size=64, pool_min_pixels=50)
    _attach(dm, POS_LIKE)
    ds = dm.train_dataset()
    calls = _counting(ds)
    batch = collate_episodes([ds[k] for k in range(4)])
    assert len(calls) == 4  # the query only (was 1 + shot)
    assert batch.support_images.shape == (4, 0, 3, 64, 64) and batch.support_masks.shape == (4, 0, 64, 64)
    assert batch.support_ids == [[]] * 4 and batch.shot == 0
    _attach(dm, MM_LIKE)  # stage 2 draws its supports as before
    ds2 = dm.train_dataset()
    calls2 = _counting(ds2)
    batch2 = collate_episodes([ds2[k] for k in range(4)])
    assert len(calls2) == 4 * 3 and batch2.support_images.shape == (4, 2, 3, 64, 64)
    # The query and class of an episode are the same with or without supports.
    assert torch.equal(batch.query_image, batch2.query_image) and torch.equal(batch.class_id, batch2.class_id)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
def test_stage1_stream_does_not_depend_on_the_shot_on_lvis(tmp_path: Path) -> None:
    root = make_fake_lvis(tmp_path / "lvis")
    kw = {"image_size": 48, "num_workers": 0, "train_pool_min_pixels": 50, "cache_dir": str(tmp_path / "c")}
    episodes = []
    for shot in (1, 5):  # 3 training images per category: no 5-shot support set exists
        dm = LVIS92iDataModule(root=str(root), shot=shot, **kw)
        _attach(dm, POS_LIKE)
        ds = dm.train_dataset()  # the pools no longer depend on the shot (were filtered by shot + 1)
        episodes.append([(ds[k]["query_id"], ds[k]["class_id"], ds[k]["query_image"]) for k in range(6)])
    for (q1, c1, i1), (q5, c5, i5) in zip(*episodes):
        assert (q1, c1) == (q5, c5) and torch.equal(i1, i5)


def test_stage1_fit_is_the_same_at_any_shot(synthetic_root: Path, tmp_path: Path) -> None:
    states = []
    for shot in (1, 2):  # the tiny set's test pools hold 3-4 images: its validation lists allow 2 shots
        cli = main(
            [
                "fit",
                *STAGE1,
                *tiny_data(synthetic_root),
                *run_dir_args(tmp_path / f"shot{shot}", "s1"),
                f"--data.init_args.shot={shot}",
                "--trainer.max_steps=3",
                "--trainer.limit_val_batches=0",
                "--model.init_args.loss.num_points=256",
            ]
        )
        states.append({k: v.clone() for k, v in cli.model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
