"""One command for a CUDA machine: speed, memory and correctness of the paper-size model on the GPU.

    python benchmarks/gpu_check.py [--out gpu_check.md]     # make gpu-check; about 5 minutes on one H100/H200
    python benchmarks/gpu_check.py --smoke                  # the same code paths, tiny, on CPU, < 1 minute

Prints and writes (``--out``) these tables:

1. paper-size stage-1 (batch 8) and stage-2 (batch 4, 1-shot) training step: median time and peak GPU
   memory for ``32-true``, ``bf16-mixed`` and ``16-mixed`` (autocast + gradient scaler, as Lightning);
2. inference episodes/s (the MM forward with backbone and POS), 1-shot and 5-shot, batch 1 and 8, 480 x 480,
   and ``benchmarks/inference_speed.py``'s tables (the predict path against ``Segmenter``);
3. every deformable-attention implementation: forward and forward+backward time, and its largest
   difference from the per-level loop (values, sampling-location and attention-weight gradients);
4. a row per backbone (``lightning_configs/backbone_<name>.yaml`` and the paper's ResNet-50): parameters
   and the frozen backbone's forward time and peak memory at 480 x 480, ``32-true`` and ``bf16-mixed``;
5. a 50-step real ``fewshot-seg fit`` (stage 1) + ``fit`` (stage 2) + ``test`` through the CLI with
   ``trainer_gpu.yaml`` on a small VOC-layout stand-in written by ``benchmarks/make_standin.py``: finite
   losses, checkpoints written, ``results.json``;
6. where the time of a paper-size stage-1 step goes: a ``torch.profiler`` trace of one step, wall time
   against GPU-busy time (the union of its kernels) per phase (forward, losses, backward, optimiser);
   the host overhead counts of ``benchmarks/host_overhead.py`` on the GPU (tensor ops, host syncs,
   blocking host-to-device copies per phase); the Segmenter eager against CUDA-graph replay
   (``cuda_graphs=True``) at batch 1 and 8.

``--only`` runs a subset of the sections (``steps,profile,overhead,graphs,inference,segmenter,deform,
backbones,cli``). ``--baseline DIR`` also runs the step and Segmenter tables with the code of another
checkout (``git worktree add DIR <rev>``; its ``src`` first on the path), in the same run on the same
card: the before -> after of a change.

``--smoke`` runs all of it with the demo-size model at 64 x 64, 2 steps, on CPU (no ``16-mixed``), the
backbone rows with a tiny model of each family (``SMOKE_BACKBONES``): the test suite runs it so the
script stays correct on machines without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_overhead
import inference_speed
from model_speed import DEMO, PAPER, _row_fn, _time, autocast, backbone_configs, deform_attn_rows

from fewshot_seg import config_dir
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.freezing import freeze
from fewshot_seg.models.ms_deform_attn import IMPLEMENTATIONS, default_impl, ms_deform_attn_core

REPO = Path(__file__).resolve().parents[1]
# --smoke: the same code path per backbone family with a model a CPU builds and runs in a second.
SMOKE_BACKBONES = {
    "resnet50 (paper default)": "resnet18",
    "resnet101": "resnet18",
    "convnext_base": "timm:convnext_atto",
    "swin_base": "timm:swin_tiny_patch4_window7_224",
    "dinov2_vitb14": "timm:vit_small_patch14_dinov2",
}


def train_step_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    cfg, size = (DEMO, 64) if smoke else (PAPER, 480)
    precisions = ["32-true", "bf16-mixed"] + ([] if device.type == "cpu" else ["16-mixed"])
    rows = ["| step | batch | precision | time (ms) | peak GPU memory (MiB) |", "|---|---:|---|---:|---:|"]
    for what, batch in (("stage-1 train step", 8), ("stage-2 train step 1-shot", 4)):
        for precision in precisions:
            fn = _row_fn(cfg, size, 2 if smoke else batch, what, device, precision)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = _time(fn, repeats, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            rows.append(f"| {what} | {batch} | {precision} | {seconds * 1e3:.1f} | {peak:.0f} |")
            del fn
    return rows


def inference_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    cfg, size = (DEMO, 64) if smoke else (PAPER, 480)
    rows = ["| shot | batch | precision | episodes/s |", "|---:|---:|---|---:|"]
    for shot in (1, 5):
        for batch in (1,) if smoke else (1, 8):
            for precision in ("32-true", "bf16-mixed"):
                fn = _row_fn(cfg, size, batch, f"episode fwd {shot}-shot", device, precision)
                seconds = _time(fn, repeats, device)
                rows.append(f"| {shot} | {batch} | {precision} | {batch / seconds:.1f} |")
    return rows


def segmenter_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    """``benchmarks/inference_speed.py``'s tables: the predict path vs Segmenter, and the MM head split."""
    cfg, size = (DEMO, 64) if smoke else (PAPER, 480)
    queries = 2 if smoke else 32
    speed = inference_speed.speed_table(cfg, size, queries, min(repeats, 3), device)
    return [*speed, "", *inference_speed.head_table(cfg, size, repeats, device)]


PHASES = ("forward", "losses", "backward", "optimiser")


def _busy_us(kernels: list[tuple[float, float]], start: float, end: float) -> float:
    """Microseconds of ``[start, end]`` during which at least one kernel ran (union of intervals)."""
    busy, cursor = 0.0, start
    for k_start, k_end in sorted(kernels):
        lo, hi = max(k_start, cursor), min(k_end, end)
        if hi > lo:
            busy += hi - lo
            cursor = hi
    return busy


def profile_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    """One stage-1 training step under ``torch.profiler``: wall and GPU-busy time per phase.

    The step is POSModule's (forward, criterion with its one device-to-host copy, backward, clipping and
    the AdamW of ``build_optimizer``), each phase ended by a device sync so that its kernels fall inside
    it; the last row is the step without those syncs.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from fewshot_seg.lightning.optim import AdamW, adamw_implementation

    cfg, size, batch = (DEMO, 64, 2) if smoke else (PAPER, 480, 8)
    torch.manual_seed(0)
    module = cfg.pos_module().to(device)
    episodes = host_overhead.episode_batch(batch, 0, size, 4).to(device).normalized()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = AdamW(params, lr=1e-4, **adamw_implementation(params))  # build_optimizer's class
    rows = ["| precision | phase | wall (ms) | GPU busy (ms) | busy / wall |", "|---|---|---:|---:|---:|"]
    for precision in ("32-true", "bf16-mixed"):

        def step(mark: bool, precision: str = precision) -> None:
            def phase(label: str) -> contextlib.AbstractContextManager:
                return record_function(label) if mark else contextlib.nullcontext()

            def end() -> None:
                if mark and device.type == "cuda":
                    torch.cuda.synchronize()

            with phase("forward"), autocast(device, precision):
                out = module(episodes)
                end()
            with phase("losses"), autocast(device, precision):
                losses = module.criterion(
                    out,
                    module.training_targets(episodes),
                    episodes.query_mask,
                    generator=module.point_generator(),
                )
                loss = sum(losses.values())
                end()
            with phase("backward"):
                opt.zero_grad(set_to_none=True)
                loss.backward()
                end()
            with phase("optimiser"):
                torch.nn.utils.clip_grad_norm_(params, 0.01, foreach=True)
                opt.step()
                end()

        step(True)  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step(True)
        events = prof.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA"]
        for name in PHASES:
            marks = [e for e in events if e.name == name and e.device_type.name == "CPU"]
            if not marks:
                continue
            start, end_ = marks[0].time_range.start, marks[0].time_range.end
            wall, busy = (end_ - start) / 1e3, _busy_us(kernels, start, end_) / 1e3
            rows.append(f"| {precision} | {name} | {wall:.1f} | {busy:.1f} | {busy / max(wall, 1e-9):.0%} |")
        seconds = _time(lambda: step(False), repeats, device)
        rows.append(f"| {precision} | whole step, no phase syncs | {seconds * 1e3:.1f} | | |")
    return rows


def overhead_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    """``benchmarks/host_overhead.py`` on this device (blocking host-to-device copies counted on CUDA)."""
    cfg, size, batch = (DEMO, 64, 2) if smoke else (PAPER, 480, 8)
    return host_overhead.report(cfg, size, batch, device=device.type)


def graphs_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    """Segmenter queries/s, eager against CUDA-graph replay, and the largest difference of the maps."""
    from fewshot_seg.segmenter import Segmenter

    cfg, size = (DEMO, 64) if smoke else (PAPER, 480)
    torch.manual_seed(0)
    module = cfg.mm_module().eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (375, 500, 3), np.uint8) for _ in range(16)]
    mask = np.zeros((375, 500), np.uint8)
    mask[100:250, 150:350] = 1
    rows = ["| batch | path | queries/s | max abs diff vs eager |", "|---:|---|---:|---:|"]
    segs = {
        graphs: Segmenter(
            module.backbone, module.pos, module.mm, image_size=size, device=device, cuda_graphs=graphs
        )
        for graphs in (False, True)
    }
    for batch in (1, 8):
        results = {}
        for graphs, seg in segs.items():
            supports = seg.encode_supports([images[0]], [mask])
            chunk = images[:batch]
            results[graphs] = seg.segment_arrays(chunk, supports, return_probabilities=True)
            seconds = _time(lambda seg=seg, s=supports, c=chunk: seg.segment_arrays(c, s), repeats, device)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(results[graphs], results[False]))
            name = "CUDA graphs" if graphs else "eager"
            rows.append(f"| {batch} | {name} | {batch / seconds:.1f} | {diff:.1e} |")
    return rows


def baseline_tables(baseline: Path, smoke: bool, repeats: int) -> list[str]:
    """The step and Segmenter tables of ``baseline``'s code (a subprocess with its ``src`` first)."""
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import gpu_check as g; "
        f"d = torch.device('cuda' if torch.cuda.is_available() and not {smoke} else 'cpu'); "
        "torch.backends.cudnn.benchmark = d.type == 'cuda'; "
        f"print('\\n'.join(g.train_step_table(d, {smoke}, {repeats}))); print(); "
        f"print('\\n'.join(g.segmenter_table(d, {smoke}, {repeats})))"
    )
    env = {**os.environ, "PYTHONPATH": f"{baseline / 'src'}{os.pathsep}{baseline}"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=baseline, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return [f"baseline at {baseline} failed: {(proc.stdout + proc.stderr)[-2000:]}"]
    return [f"code of {baseline}", "", *proc.stdout.splitlines()]


def backbone_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    size = 64 if smoke else 480
    rows = [
        "| config | name | params (M) | new (M) | precision | fwd (ms) | peak GPU memory (MiB) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for label, backbone in backbone_configs().items():
        name = SMOKE_BACKBONES.get(label, "resnet18") if smoke else backbone["name"]
        torch.manual_seed(0)
        model = build_backbone(name, weights=None, pyramid_channels=backbone.get("pyramid_channels", 256))
        params = sum(p.numel() for p in model.parameters()) / 1e6
        new = sum(
            p.numel() for n in getattr(model, "new_modules", ()) for p in model.get_submodule(n).parameters()
        )
        model = freeze(model.to(device))
        images = torch.randn(1, 3, size, size, device=device)
        for precision in ("32-true", "bf16-mixed"):

            def fwd(
                precision: str = precision, model: torch.nn.Module = model, images: torch.Tensor = images
            ) -> None:
                with torch.no_grad(), autocast(device, precision):
                    model(images)

            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            seconds = _time(fwd, repeats, device)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
            rows.append(
                f"| {label} | {name} | {params:.1f} | {new / 1e6:.1f} | {precision} | {seconds * 1e3:.1f} | "
                f"{peak:.0f} |"
            )
    return rows


def deform_attn_table(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    size = 64 if smoke else 480
    rows = [
        f"default on {device.type}: {default_impl(device)}",
        "",
        "| batch | implementation | fwd (ms) | fwd+bwd (ms) | max abs diff vs loop (out / grads) |",
        "|---:|---|---:|---:|---|",
    ]
    for batch in (2,) if smoke else (2, 8):
        diffs = _agreement(device, batch, size)
        for impl, fwd, fwd_bwd in deform_attn_rows(repeats, device, batch, size):
            rows.append(f"| {batch} | {impl} | {fwd * 1e3:.2f} | {fwd_bwd * 1e3:.2f} | {diffs[impl]} |")
    return rows


def _agreement(device: torch.device, batch: int, size: int) -> dict[str, str]:
    """Max abs difference of each implementation's output and gradients from the per-level loop."""
    torch.manual_seed(0)
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    tokens = sum(h * w for h, w in shapes)
    inputs = [
        torch.randn(batch, tokens, 8, 32, device=device),
        torch.rand(batch, tokens, 8, 3, 4, 2, device=device),
        torch.rand(batch, tokens, 8, 3, 4, device=device).softmax(-1),
    ]
    upstream = torch.randn(batch, tokens, 8 * 32, device=device)
    results = {}
    for impl in IMPLEMENTATIONS:
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = ms_deform_attn_core(leaves[0], shapes, leaves[1], leaves[2], impl=impl)
        (out * upstream).sum().backward()
        results[impl] = [out.detach(), *(t.grad for t in leaves)]
    ref = results["loop"]
    return {
        impl: " / ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(res, ref))
        for impl, res in results.items()
    }


def cli_table(device: torch.device, smoke: bool, work: Path) -> list[str]:
    """stage-1 fit, stage-2 fit, test through the real CLI on a VOC-layout stand-in."""
    voc = work / "standin" / "voc"
    if not voc.exists():
        scale = "0.005" if smoke else "0.02"
        make = [sys.executable, str(REPO / "benchmarks" / "make_standin.py"), "--out", str(work / "standin")]
        distinct = ["--distinct", "20"] if smoke else []  # hard links to a few renders: seconds, not minutes
        subprocess.run([*make, "--only", "voc", "--scale", scale, *distinct], check=True)
    steps = 2 if smoke else 50
    configs = ["trainer.yaml"] + ([] if device.type == "cpu" else ["trainer_gpu.yaml"])

    def files(stage: str) -> list[str]:  # config files first: a later -c would override the values below
        return [arg for c in [*configs, "data_pascal.yaml", stage] for arg in ("-c", str(config_dir() / c))]

    common = [
        f"--data.init_args.root={voc}",
        f"--data.init_args.image_size={64 if smoke else 480}",
        "--data.init_args.num_workers=2" if smoke else "--data.init_args.num_workers=8",
        "--data.init_args.val_episodes=4" if smoke else "--data.init_args.val_episodes=40",
        "--data.init_args.test_episodes=8" if smoke else "--data.init_args.test_episodes=200",
        "--data.init_args.pool_min_pixels=50" if smoke else "--data.init_args.pool_min_pixels=2048",
        f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}",
        f"--trainer.default_root_dir={work}",
        f"--trainer.logger.init_args.save_dir={work}",
    ]
    stage1 = "stage1_pos_cpu_demo.yaml" if smoke else "stage1_pos.yaml"
    stage2 = "stage2_mm_cpu_demo.yaml" if smoke else "stage2_mm.yaml"
    no_imagenet = ["--model.init_args.backbone.weights=null"]  # no download on an offline machine
    cli = [sys.executable, "-m", "fewshot_seg.cli"]
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    rows = ["| run | wall (s) | exit | what it wrote |", "|---|---:|---:|---|"]

    def run(name: str, args: list[str], expect: Path) -> None:
        start = time.perf_counter()
        proc = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
        wrote = str(expect) if expect.exists() else f"MISSING {expect} (see {work / name}.log)"
        rows.append(f"| {name} | {wall:.1f} | {proc.returncode} | {wrote} |")
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed; last output:\n{(proc.stdout + proc.stderr)[-3000:]}")

    s1 = work / "fewshot-seg" / "s1" / "checkpoints" / "last.ckpt"
    args1 = [*files(stage1), *common, "--trainer.logger.init_args.version=s1"]
    run(
        "stage-1 fit",
        ["fit", *args1, *no_imagenet, *(["--model.init_args.loss.num_points=256"] if smoke else [])],
        s1,
    )
    _finite_losses(s1, rows)
    s2 = work / "fewshot-seg" / "s2" / "checkpoints" / "last.ckpt"
    args2 = [*files(stage2), *common, f"--model.init_args.stage1_checkpoint={s1}"]
    run("stage-2 fit", ["fit", *args2, "--trainer.logger.init_args.version=s2"], s2)
    _finite_losses(s2, rows)
    results = work / "fewshot-seg" / "t" / "results.json"
    run("test", ["test", *args2, "--trainer.logger.init_args.version=t", f"--ckpt_path={s2}"], results)
    res = json.loads(results.read_text())
    rows.append(
        f"| test results | | | mIoU {res['miou']:.2f}, oracle {res['oracle_miou']:.2f} ({res['protocol']}) |"
    )
    return rows


def _finite_losses(ckpt: Path, rows: list[str]) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SystemExit(f"non-finite weights in {ckpt}: {bad[:5]}")
    rows.append(f"| weights of {ckpt.parent.parent.name} | | | all finite ({len(state)} tensors) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (what the test suite runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="where the tables are written")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per row (default 5; smoke 1)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="stand-in data and CLI runs (default: a temp dir)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="sections to run (comma-separated): steps, profile, overhead, graphs, inference, segmenter, "
        "deform, backbones, cli",
    )
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a checkout of the code before a change (before -> after)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    else:
        parser.error("no CUDA device: run on a GPU machine, or use --smoke for the CPU code-path check")
    repeats = args.repeats or (1 if args.smoke else 5)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke)"
    header = [
        f"# gpu_check on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"median of {repeats} timed runs after a warm-up; "
        f"model {'demo at 64 px' if args.smoke else 'paper at 480'}",
    ]
    sections = [
        ("Where a stage-1 step spends its time (torch.profiler)", profile_table),
        ("Host overhead per phase (benchmarks/host_overhead.py)", overhead_table),
        ("Training step", train_step_table),
        ("Segmenter: eager vs CUDA graphs", graphs_table),
        ("Inference (backbone + POS + Mask Matching)", inference_table),
        ("Segmenter vs the predict path (supports encoded once, batched queries)", segmenter_table),
        ("Deformable attention", deform_attn_table),
        ("Backbones (frozen forward, batch 1)", backbone_table),
    ]
    keys = {
        profile_table: "profile",
        overhead_table: "overhead",
        train_step_table: "steps",
        graphs_table: "graphs",
        inference_table: "inference",
        segmenter_table: "segmenter",
        deform_attn_table: "deform",
        backbone_table: "backbones",
    }
    only = set(args.only.split(",")) if args.only else None
    sections = [(title, table) for title, table in sections if only is None or keys[table] in only]
    out: list[str] = header
    start = time.perf_counter()
    for title, table in sections:
        rows = table(device, args.smoke, repeats)
        out += ["", f"## {title}", "", *rows]
        print("\n".join(out[-len(rows) - 3 :]), flush=True)
    if args.baseline is not None:
        rows = baseline_tables(args.baseline, args.smoke, repeats)
        out += ["", "## Before: training step and Segmenter with the baseline's code", "", *rows]
        print("\n".join(out[-len(rows) - 3 :]), flush=True)
    if only is None or "cli" in only:
        rows = cli_table(device, args.smoke, work)
        out += ["", "## fewshot-seg fit + fit + test through the CLI", "", *rows]
        print("\n".join(out[-len(rows) - 3 :]))
    out += ["", f"total {time.perf_counter() - start:.0f} s"]
    args.out.write_text("\n".join(out) + "\n")
    print(f"\ntables written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
