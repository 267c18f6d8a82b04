"""Host overhead of a training step: tensor operations dispatched and host syncs asked for, per phase.

    python benchmarks/host_overhead.py                     # paper size (R-50, 100 queries), batch 8, CPU
    python benchmarks/host_overhead.py --config demo       # the CPU demo model
    python benchmarks/host_overhead.py --device cuda       # also counts blocking host-to-device copies
    python benchmarks/host_overhead.py --baseline /tmp/base  # before -> after (a checkout of the old code)

A GPU step that does not get faster with bf16 is bound by the host: Python and the dispatcher issue one
kernel per tensor operation, and every host sync drains the device queue. Both are deterministic counts,
so they are measured here on any machine, with a real ``Trainer`` step (forward, losses, backward, gradient
clipping, AdamW, logging) of ``POSModule`` (stage 1) and ``MMModule`` (stage 2), and the Segmenter's query
path (``Segmenter.segment_arrays``, batch 1), each after one warm-up step:

* **tensor ops**: every ATen operation dispatched (a ``TorchDispatchMode``; a backward node's operations
  included; views included);
* **host syncs**: every call that waits for the device: ``item``/``tolist``/``bool``/``int``/``float`` of a
  tensor, ``cpu()``/``numpy()``, and operations whose output size depends on the data (``nonzero``,
  ``unique``, ``masked_select``); counted with the file and line that asked, split into this project's
  code and the rest (Lightning). On a CUDA device, blocking host-to-device copies are counted too (on the
  CPU there is no such copy to see).

``--baseline DIR`` counts the same steps with another checkout's package (``DIR/src`` first on the path,
in a subprocess) and prints before -> after tables: the counts of a change in one command.

The image size does not change the counts (``--size``, default 128 to keep a CPU run short; the phase
tables of docs/gpu.md were counted at this size). The labels have a fixed number of segments per image
(``--segments``), so the number of targets is the same in every run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import DEMO, PAPER, ModelConfig

from fewshot_seg.episode import collate_episodes

REPO = Path(__file__).resolve().parents[1]
# Where "this project's code" is (host syncs are attributed to it); --project-root moves it (a baseline).
PROJECT_DIRS = (str(REPO / "src"), str(REPO / "datamodules"))
TRAIN_PHASES = ["forward", "losses", "backward", "clip + optimiser"]

# Tensor methods that copy a value to the host (a device sync on a GPU).
_SYNC_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
# ATen operations whose output size is data-dependent: the host must wait for the value (name prefixes).
_SYNC_OPS = ("nonzero", "unique", "_unique", "masked_select", "_local_scalar_dense")
# AdamW reads its step counters with item(); they are host tensors unless the optimiser is fused or
# capturable, so those reads wait for nothing.
_HOST_STATE_FILES = (f"torch{os.sep}optim{os.sep}",)


def _asker() -> str:
    """``file:line`` of the innermost frame of this project's code on the stack, else ``other``."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PROJECT_DIRS):
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "other"


class Counter(TorchDispatchMode):
    """Counts ATen operations per phase and the host syncs below them (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "idle"
        self.ops: collections.Counter[str] = collections.Counter()
        self.by_op: collections.Counter[tuple[str, str]] = collections.Counter()
        self.syncs: collections.Counter[tuple[str, str]] = collections.Counter()
        self.in_sync_call = 0
        self.host_storages: dict[int, Any] = {}

    def sync(self, what: str, tensor: torch.Tensor | None = None) -> None:
        """Count a host sync, unless ``tensor``'s values are on the host already: they came with an earlier
        counted copy (on the CPU, ``x.cpu()`` returns ``x``: its storage is remembered), or they are the
        optimiser's host step counters."""
        if self.phase == "idle":
            return
        if tensor is not None and tensor.untyped_storage().data_ptr() in self.host_storages:
            return
        caller = [
            f
            for f in traceback.extract_stack()
            if f.filename != __file__ and "torch/utils/_" not in f.filename
        ]
        if caller and any(part in caller[-1].filename for part in _HOST_STATE_FILES):
            return
        self.syncs[(self.phase, f"{what} @ {_asker()}")] += 1
        if tensor is not None and what in ("cpu", "numpy"):
            storage = tensor.untyped_storage()
            self.host_storages[storage.data_ptr()] = storage  # held: its address is not reused meanwhile

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.phase != "idle":
            self.ops[self.phase] += 1
            name = func.__name__
            self.by_op[(self.phase, name)] += 1
            if not self.in_sync_call and name.startswith(_SYNC_OPS):
                self.sync(name.split(".")[0])
            if name.startswith(("_to_copy", "copy_")) and not kwargs.get("non_blocking", False):
                self._h2d(func, args, kwargs)
        return func(*args, **kwargs)

    def _h2d(self, func: Any, args: tuple, kwargs: dict) -> None:
        src = args[1] if func.__name__.startswith("copy_") else args[0]
        dst_device = args[0].device if func.__name__.startswith("copy_") else kwargs.get("device")
        to_device = dst_device is not None and torch.device(dst_device).type != "cpu"
        if isinstance(src, torch.Tensor) and src.device.type == "cpu" and to_device:
            self.sync("blocking host-to-device copy")


class SyncCalls(TorchFunctionMode):
    """Counts the tensor methods that copy values to the host (``item``, ``cpu``, ``bool`` ...)."""

    def __init__(self, counter: Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS and args and isinstance(args[0], torch.Tensor):
            self.counter.sync(name, args[0])
            self.counter.in_sync_call += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter.in_sync_call -= 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting() -> Iterator[Counter]:
    counter = Counter()
    with SyncCalls(counter), counter:
        yield counter


class PhaseCallback(pl.Callback):
    """Switches the counter's phase at the Lightning hooks of the second training step."""

    def __init__(self, counter: Counter, step: int = 1) -> None:
        self.counter, self.step = counter, step

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.counter.phase = "forward"

    def on_before_backward(self, trainer: pl.Trainer, module: Any, loss: torch.Tensor) -> None:
        if self.counter.phase != "idle":
            self.counter.phase = "backward"

    def on_after_backward(self, trainer: pl.Trainer, module: Any) -> None:
        if self.counter.phase != "idle":
            self.counter.phase = "clip + optimiser"

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        self.counter.phase = "idle"


def _after_forward(module: torch.nn.Module, counter: Counter) -> None:
    """The phase becomes ``losses`` when the module's forward returns (POS / MM outputs computed)."""

    def hook(*_: Any) -> None:
        if counter.phase == "forward":
            counter.phase = "losses"

    module.register_forward_hook(hook)


def episode_batch(batch: int, shot: int, size: int, segments: int, seed: int = 0):
    """A collated batch of random uint8 episodes; each query label has ``segments`` values (0 included)
    in horizontal bands, and an ignore (255) band."""
    rng = np.random.default_rng(seed)
    samples = []
    for b in range(batch):
        semantic = np.zeros((size, size), np.uint8)
        bands = np.array_split(np.arange(size), segments + 1)
        for i, rows in enumerate(bands[1:-1], start=1):
            semantic[rows] = 1 + (b + i) % 20
        semantic[bands[-1]] = 255
        cls = int(semantic[bands[1][0], 0])
        samples.append(
            {
                "query_image": torch.from_numpy(rng.integers(0, 256, (3, size, size), np.uint8)),
                "query_mask": torch.from_numpy(np.where(semantic == cls, 1, 0).astype(np.uint8)),
                "support_images": torch.from_numpy(rng.integers(0, 256, (shot, 3, size, size), np.uint8)),
                "support_masks": torch.from_numpy(rng.integers(0, 2, (shot, size, size), np.uint8)),
                "class_id": cls,
                "query_semantic": torch.from_numpy(semantic),
                "query_valid_size": (size, size),
                "query_label_orig": torch.from_numpy(semantic.copy()),
                "query_id": f"q{b}",
                "support_ids": [f"s{b}_{k}" for k in range(shot)],
            }
        )
    return collate_episodes(samples)


def count_training_step(module: pl.LightningModule, batch: Any, device: str, precision: str) -> Counter:
    """Counts of the second of two Trainer steps on ``batch`` (the first warms up)."""
    with counting() as counter:
        counter.phase = "idle"
        _after_forward(module, counter)
        fit_on(module, batch, 2, [PhaseCallback(counter)], accelerator=device, precision=precision)
    return counter


def fit_on(module: pl.LightningModule, batch: Any, steps: int, callbacks: list, **trainer: Any) -> None:
    """``steps`` training steps on copies of ``batch`` with a quiet Trainer (no logger, checkpoint or
    validation; gradient clipping at the configs' 0.01); ``trainer`` overrides Trainer arguments."""
    loader = DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b)
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": steps,
        "gradient_clip_val": 0.01,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        **trainer,
    }
    pl.Trainer(callbacks=callbacks, **options).fit(module, train_dataloaders=loader)


def count_segmenter_query(cfg: ModelConfig, size: int, device: str, batch: int = 1) -> Counter:
    """Counts of one ``Segmenter.segment_arrays`` call of ``batch`` queries (after a warm-up call)."""
    from fewshot_seg.segmenter import Segmenter

    torch.manual_seed(0)
    module = cfg.mm_module().eval()
    seg = Segmenter(module.backbone, module.pos, module.mm, image_size=size, device=device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = 1
    supports = seg.encode_supports([image], [mask])
    queries = [image] * batch
    seg.segment_arrays(queries, supports)
    with counting() as counter:
        counter.phase = "query"
        seg.segment_arrays(queries, supports)
        counter.phase = "idle"
    return counter


def table(title: str, counter: Counter, phases: list[str], top: int = 0) -> list[str]:
    lines = [
        f"{title}",
        "",
        "| phase | tensor ops | host syncs (this project) | host syncs (other) |",
        "|---|---:|---:|---:|",
    ]
    for phase, n in summary(counter, phases).items():
        lines.append(f"| {phase} | {n['ops']:,} | {n['ours']} | {n['other']} |")
    where = collections.Counter()
    for (_, what), n in counter.syncs.items():
        where[what] += n
    if where:
        lines += ["", "host syncs by call site: " + "; ".join(f"{w} x{n}" for w, n in where.most_common())]
    if top:
        for phase in phases:
            ops = collections.Counter({name: n for (p, name), n in counter.by_op.items() if p == phase})
            lines += [
                "",
                f"most dispatched in {phase}: " + ", ".join(f"{o} {n}" for o, n in ops.most_common(top)),
            ]
    return lines


PART_TITLES = {
    "stage1": "stage-1 training step, batch {batch}",
    "stage2": "stage-2 training step, batch {half}, 1-shot",
    "segmenter": "Segmenter query, batch 1, 1-shot",
}


def count_part(
    part: str, cfg: ModelConfig, size: int, batch: int, segments: int, device: str, precision: str
) -> Counter:
    """The counter of one of ``stage1``, ``stage2`` (half the batch, 1-shot) or ``segmenter``."""
    if part == "segmenter":
        return count_segmenter_query(cfg, size, device)
    torch.manual_seed(0)
    module = cfg.pos_module() if part == "stage1" else cfg.mm_module()
    module.eval_class_ids = [1]
    episodes = (
        episode_batch(batch, 0, size, segments)
        if part == "stage1"
        else episode_batch(max(1, batch // 2), 1, size, segments)
    )
    return count_training_step(module, episodes, device, precision)


def phases_of(part: str) -> list[str]:
    return ["query"] if part == "segmenter" else TRAIN_PHASES


def summary(counter: Counter, phases: list[str]) -> dict[str, dict[str, int]]:
    """``{phase: {"ops", "ours", "other"}}`` with a ``total`` row (what ``--json`` writes)."""
    out = {}
    for phase in [*phases, "total"]:
        keep: Callable[[str], bool] = (lambda p: True) if phase == "total" else (lambda p, ph=phase: p == ph)
        out[phase] = {
            "ops": sum(n for p, n in counter.ops.items() if keep(p)),
            "ours": sum(n for (p, w), n in counter.syncs.items() if keep(p) and not w.endswith("@ other")),
            "other": sum(n for (p, w), n in counter.syncs.items() if keep(p) and w.endswith("@ other")),
        }
    return out


def compare_table(
    title: str, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]
) -> list[str]:
    """Before -> after of two :func:`summary` results (syncs: this project's + others')."""
    lines = [
        f"{title}",
        "",
        "| phase | tensor ops before | after | host syncs before | after |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase, a in after.items():
        b = before.get(phase, {"ops": 0, "ours": 0, "other": 0})
        syncs_b, syncs_a = b["ours"] + b["other"], a["ours"] + a["other"]
        lines.append(f"| {phase} | {b['ops']:,} | {a['ops']:,} | {syncs_b} | {syncs_a} |")
    return lines


def report(
    cfg: ModelConfig,
    size: int = 128,
    batch: int = 8,
    segments: int = 4,
    device: str = "cpu",
    precision: str = "32-true",
    parts: tuple[str, ...] = ("stage1", "stage2", "segmenter"),
    top: int = 0,
) -> list[str]:
    """The phase tables of ``parts`` (stage-2 batches are half of ``batch``), as markdown lines."""
    lines = [f"host overhead: {cfg.name}, {size} px, device {device}, precision {precision}", ""]
    for part in parts:
        counter = count_part(part, cfg, size, batch, segments, device, precision)
        title = PART_TITLES[part].format(batch=batch, half=max(1, batch // 2))
        lines += [*table(title, counter, phases_of(part), top), ""]
    return lines


def _baseline_summaries(baseline: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Counts of ``args.parts`` with the package of the checkout ``baseline`` (a subprocess)."""
    if not (baseline / "src" / "fewshot_seg").is_dir():
        raise SystemExit(f"--baseline {baseline}: no src/fewshot_seg there (a checkout of this project?)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "counts.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(baseline / "src"), str(baseline)])}
        cmd = [sys.executable, __file__, "--json", str(out), "--project-root", str(baseline)]
        for flag in ("config", "size", "batch", "segments", "device", "precision", "parts"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", choices=("paper", "demo"), default="paper", help="model size (default paper)"
    )
    parser.add_argument("--size", type=int, default=128, help="image side; the counts do not depend on it")
    parser.add_argument("--batch", type=int, default=8, help="stage-1 episodes per step (stage 2: half)")
    parser.add_argument("--segments", type=int, default=4, help="label values per query image (targets)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="32-true", help="Lightning precision of the training steps")
    parser.add_argument(
        "--top", type=int, default=0, help="also list the N most dispatched operations per phase"
    )
    parser.add_argument(
        "--parts", default="stage1,stage2,segmenter", help="comma-separated subset of stage1,stage2,segmenter"
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a checkout of the code before a change: before -> after"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here (JSON)")
    parser.add_argument("--project-root", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.project_root is not None:
        global PROJECT_DIRS
        PROJECT_DIRS = (str(args.project_root / "src"), str(args.project_root / "datamodules"))
    cfg = PAPER if args.config == "paper" else DEMO
    parts = args.parts.split(",")
    before = _baseline_summaries(args.baseline, args) if args.baseline is not None else None
    counts: dict[str, dict] = {}
    print(f"host overhead: {cfg.name}, {args.size} px, device {args.device}, precision {args.precision}\n")
    for part in parts:  # printed part by part: a long run shows what it has
        counter = count_part(part, cfg, args.size, args.batch, args.segments, args.device, args.precision)
        counts[part] = summary(counter, phases_of(part))
        title = PART_TITLES[part].format(batch=args.batch, half=max(1, args.batch // 2))
        if before is not None:
            lines = compare_table(f"{title} (before: {args.baseline})", before[part], counts[part])
        else:
            lines = table(title, counter, phases_of(part), args.top)
        print("\n".join([*lines, ""]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
