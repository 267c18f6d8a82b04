"""Inference speed: today's ``predict`` path against :class:`fewshot_seg.Segmenter`, side by side in one run.

    python benchmarks/inference_speed.py                       # paper size (ResNet-50, N = 100, 480), CPU
    python benchmarks/inference_speed.py --queries 16 --device cuda
    python benchmarks/inference_speed.py --smoke               # demo size at 128, same code paths: seconds

Rows, at 1 and 5 shots, over the same ``--queries`` VOC-sized query images (500x375, uint8):

* **predict path**: what ``fewshot-seg predict`` runs per query (batch 1): the episode built as the
  DataModule builds it (``TestTransform``, normalisation, supports included), ``MMModule.predict_step``
  (backbone on the query *and* the K supports, POS, Mask Matching, resize to the image), no file writing.
* **Segmenter batch 1 / batch 8**: ``encode_supports`` once (its time included), then ``segment_arrays``
  on batches of queries.

queries/s = queries / total seconds (best of ``--repeats``, each round alternating the paths so that a
change of machine load hits them alike). A second table splits the Mask Matching head at K shots into
its support part (``encode_supports``: Self-Alignment, 1x1 reduction, masks and positional maps) and its
query part (``match``), on backbone features computed beforehand. A third table labels the queries with 1,
3 and 10 classes at once (``Segmenter.segment_classes``: backbone and POS once per query, Mask Matching once
per class) against as many single-class runs. Random weights: speed does not depend on them.

    python benchmarks/inference_speed.py --classes-only        # the third table alone
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import DEMO, PAPER, ModelConfig

from datamodules.episodes import episode_sample
from datamodules.transforms import TestTransform
from fewshot_seg.episode import IGNORE_INDEX, collate_episodes
from fewshot_seg.segmenter import Segmenter


def _images(n: int, seed: int, hw: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for _ in range(n)]


def _masks(n: int, hw: tuple[int, int]) -> list[np.ndarray]:
    out = []
    for i in range(n):
        m = np.zeros(hw, np.uint8)
        m[hw[0] // 4 : hw[0] // 2 + 10 * i, hw[1] // 4 : 3 * hw[1] // 4] = 1
        out.append(m)
    return out


def predict_path(module: torch.nn.Module, size: int, supports, queries, device: torch.device) -> None:
    """Batch-1 episodes as the folder DataModule builds them, through ``MMModule.predict_step``."""
    transform = TestTransform(size)
    sup = [(img, lab) for img, lab, _ in (transform(i, m) for i, m in supports)]  # cached, as FolderEpisodes
    for query in queries:
        q_img, q_lab, valid = transform(query, np.full(query.shape[:2], IGNORE_INDEX, np.uint8))
        sample = episode_sample(
            query=q_img,
            query_label=q_lab,
            supports=sup,
            class_id=1,
            novel_classes=(),
            query_id="q",
            support_ids=[],
            valid_size=valid,
            scored_label=np.zeros(query.shape[:2], np.uint8),
        )
        batch = module.on_after_batch_transfer(collate_episodes([sample]).to(device), 0)  # as the Trainer
        with torch.no_grad():
            module.predict_step(batch, 0)


def segmenter_path(seg: Segmenter, supports, queries, batch_size: int) -> None:
    encoded = seg.encode_supports([i for i, _ in supports], [m for _, m in supports])
    for start in range(0, len(queries), batch_size):
        seg.segment_arrays(queries[start : start + batch_size], encoded)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def speed_table(cfg: ModelConfig, size: int, n_queries: int, repeats: int, device: torch.device) -> list[str]:
    torch.manual_seed(0)
    module = cfg.mm_module().eval().to(device)
    seg = Segmenter(module.backbone, module.pos, module.mm, image_size=size, device=device)
    queries = _images(n_queries, 1, (375, 500))
    lines = [
        "| shots | path | queries/s | s/query | vs predict path |",
        "|---:|---|---:|---:|---:|",
    ]
    for shot in (1, 5):
        supports = list(zip(_images(shot, 2, (375, 500)), _masks(shot, (375, 500))))
        paths = {
            "predict path (batch 1)": lambda s=supports: predict_path(module, size, s, queries, device),
            "Segmenter batch 1": lambda s=supports: segmenter_path(seg, s, queries, 1),
            "Segmenter batch 8": lambda s=supports: segmenter_path(seg, s, queries, 8),
        }
        segmenter_path(seg, supports, queries[:2], 2)  # warm-up (allocator, lazy init)
        predict_path(module, size, supports, queries[:1], device)
        best = {name: float("inf") for name in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                best[name] = min(best[name], _seconds(fn, device))
        base = n_queries / best["predict path (batch 1)"]
        for name, seconds in best.items():
            rate = n_queries / seconds
            lines.append(f"| {shot} | {name} | {rate:.3f} | {seconds / n_queries:.2f} | {rate / base:.2f}x |")
    return lines


def head_table(cfg: ModelConfig, size: int, repeats: int, device: torch.device) -> list[str]:
    """Mask Matching head alone at 1..5 shots: support part vs query part (features given)."""
    torch.manual_seed(0)
    module = cfg.mm_module().eval().to(device)
    mm = module.mm
    images = torch.randn(1, 3, size, size, device=device)
    lines = [
        "| shots | MM head (ms) | support part (ms) | query part (ms) | head / 1-shot head |",
        "|---:|---:|---:|---:|---:|",
    ]
    with torch.no_grad():
        q_feats = module.backbone(images)
        logits = module.pos(q_feats)["pred_masks"].float()
        first = None
        for shot in (1, 2, 3, 4, 5):
            sup_imgs = torch.randn(1, shot, 3, size, size, device=device)
            masks = (torch.rand(1, shot, size, size, device=device) > 0.5).long()
            feats = module.backbone(sup_imgs.flatten(0, 1))
            per_shot = [{k: v[i : i + 1] for k, v in feats.items()} for i in range(shot)]
            mm.encode_supports(per_shot, masks)  # warm-up
            enc_t, match_t = [], []
            for _ in range(repeats):
                enc_t.append(_seconds(lambda f=per_shot, m=masks: mm.encode_supports(f, m), device))
                encoded = mm.encode_supports(per_shot, masks)
                match_t.append(_seconds(lambda e=encoded: mm.match(q_feats, e, logits, (size, size)), device))
            enc, match = min(enc_t), min(match_t)
            first = first or (enc + match)
            lines.append(
                f"| {shot} | {(enc + match) * 1e3:.0f} | {enc * 1e3:.0f} | {match * 1e3:.0f} | "
                f"{(enc + match) / first:.2f}x |"
            )
    return lines


def classes_table(
    cfg: ModelConfig, size: int, n_queries: int, repeats: int, device: torch.device, counts: tuple[int, ...]
) -> Iterator[str]:
    """``segment_classes`` with 1, 3, 10 classes (1 shot each) against that many single-class runs.

    The N classes are encoded once beforehand (not timed: a labelling job encodes them once for all its
    queries); each round times ``segment_class_arrays`` over the queries, and one single-class run
    (``segment_arrays``, the same batch size) in the same round. "N single-class runs" is N times that
    run's time: what labelling N classes one at a time costs.
    """
    torch.manual_seed(0)
    module = cfg.mm_module().eval().to(device)
    seg = Segmenter(module.backbone, module.pos, module.mm, image_size=size, device=device)
    queries = _images(n_queries, 1, (375, 500))
    bs = seg.default_batch_size
    images, masks = _images(max(counts), 3, (375, 500)), _masks(max(counts), (375, 500))
    single = seg.encode_supports(images[:1], masks[:1])
    yield "| classes | queries/s | s/query | vs 1 class | N single-class runs (s/query) | vs N runs |"
    yield "|---:|---:|---:|---:|---:|---:|"
    first = None
    for n in counts:
        classes = seg.encode_classes({f"class {i}": [(images[i], masks[i])] for i in range(n)})
        seg.segment_class_arrays(queries[:1], classes)  # warm-up
        batches = [queries[i : i + bs] for i in range(0, n_queries, bs)]
        multi_t, single_t = [], []
        for _ in range(repeats):
            multi_t.append(_seconds(lambda: [seg.segment_class_arrays(b, classes) for b in batches], device))  # noqa: B023
            single_t.append(_seconds(lambda: [seg.segment_arrays(b, single) for b in batches], device))  # noqa: B023
        multi, one = min(multi_t) / n_queries, min(single_t) / n_queries
        first = first or multi
        cells = [
            f"{1 / multi:.3f}",
            f"{multi:.2f}",
            f"{multi / first:.2f}x",
            f"{n * one:.2f}",
            f"{n * one / multi:.2f}x",
        ]
        yield f"| {n} | " + " | ".join(cells) + " |"  # row by row: a slow CPU shows the first rows early


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="demo model at 128 px, 2 queries, 1 repeat")
    parser.add_argument(
        "--classes-only",
        action="store_true",
        help="only the N-classes table (segment_classes at 1, 3, 10 classes)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg, size = (DEMO, 128) if args.smoke else (PAPER, 480)
    n, repeats = (2, 1) if args.smoke else (args.queries, args.repeats)
    print(f"{cfg.name} at {size}, device={device}, threads={args.threads}, {n} queries, best of {repeats}")
    if not args.classes_only:
        print("\n".join(speed_table(cfg, size, n, repeats, device)), flush=True)
        print()
        print("\n".join(head_table(cfg, size, repeats, device)), flush=True)
        print()
    for line in classes_table(cfg, size, n, repeats, device, (1, 3, 10)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
