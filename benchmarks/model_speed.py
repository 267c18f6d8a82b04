"""Model speed and memory: forward times of backbone / POS / MM, a training step of each stage, and the
multi-scale deformable-attention core (every implementation) against the straightforward per-level loop.

    python benchmarks/model_speed.py               # paper configuration at 480x480 + the CPU demo at 128
    python benchmarks/model_speed.py --sizes 480 --repeats 3 --device cuda
    python benchmarks/model_speed.py --only attn   # just the deformable-attention table
    python benchmarks/model_speed.py --only backbones --sizes 480   # a row per backbone_<name>.yaml

Every time is the median of ``--repeats`` runs after one warm-up run. Each model row runs in a fresh
(spawned) process, so its peak memory belongs to that row alone: on CPU the peak resident set size of
that process (model, inputs and the Python/torch/Lightning runtime included; the idle column is that
runtime), on CUDA ``torch.cuda.max_memory_allocated``. Random weights (``weights=None``): speed does not
depend on them. The models are built by POSModule / MMModule: the paper sizes are their defaults, the
demo sizes are read from ``lightning_configs/stage{1_pos,2_mm}_cpu_demo.yaml``.

The backbone table has a row per ``lightning_configs/backbone_<name>.yaml`` (and the paper's ResNet-50):
parameters (of which new: a ViT's feature pyramid) and the frozen backbone's forward time and peak
memory on one image of each ``--sizes``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import yaml

from fewshot_seg import config_dir
from fewshot_seg.lightning.mm_module import MMModule
from fewshot_seg.lightning.pos_module import POSModule
from fewshot_seg.models.backbone import build_backbone
from fewshot_seg.models.criterion import semantic_to_targets
from fewshot_seg.models.freezing import freeze
from fewshot_seg.models.ms_deform_attn import IMPLEMENTATIONS, default_impl, ms_deform_attn_core


def _init_args(name: str) -> dict:
    return yaml.safe_load((config_dir() / name).read_text())["model"]["init_args"]


@dataclass(frozen=True)
class ModelConfig:
    """A named model size: POSModule (stage 1) and MMModule (stage 2) arguments, as in a stage YAML."""

    name: str
    stage1: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)

    def pos_module(self) -> POSModule:
        return POSModule(**{**self.stage1, "backbone": {**self.stage1.get("backbone", {}), "weights": None}})

    def mm_module(self) -> MMModule:
        # Stage 2 without a checkpoint takes the backbone/POS configurations as arguments (stage 1's).
        backbone = {**self.stage1.get("backbone", {}), "weights": None}
        return MMModule(
            **{**self.stage2, "stage1_checkpoint": None, "backbone": backbone, "pos": self.stage1.get("pos")}
        )


PAPER = ModelConfig("paper (R-50)")  # the modules' defaults are the paper's sizes
DEMO = ModelConfig(
    "demo (R-18)", _init_args("stage1_pos_cpu_demo.yaml"), _init_args("stage2_mm_cpu_demo.yaml")
)

ROWS = (
    "backbone fwd",
    "POS fwd",
    "MM fwd 1-shot",
    "MM fwd 5-shot",
    "stage-1 train step",
    "stage-2 train step 1-shot",
    "stage-2 train step 5-shot",
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call (allocator, lazy init, cudnn autotune)."""
    if warmup:
        fn()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _split_shots(feats: dict[str, torch.Tensor], shot: int) -> list[dict[str, torch.Tensor]]:
    """Features of ``[K*B]`` shot-major stacked supports -> K dicts of ``[B, ...]``."""
    return [{k: v.view(shot, -1, *v.shape[1:])[i] for k, v in feats.items()} for i in range(shot)]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a Lightning ``precision`` ("32-true", "bf16-mixed", "16-mixed")."""
    if precision == "32-true":
        return contextlib.nullcontext()
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def _row_fn(
    cfg: ModelConfig, size: int, batch: int, what: str, device: torch.device, precision: str = "32-true"
) -> Callable[[], object]:
    """A closure running one benchmark row; modules and inputs are built outside the timed region.

    ``precision`` wraps the forward passes in autocast as Lightning's precision plugin does (with a
    gradient scaler for ``16-mixed``).
    """
    torch.manual_seed(0)
    amp = lambda: autocast(device, precision)  # noqa: E731 (a fresh context per use)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    shot = 5 if "5-shot" in what else 1
    # Stage-1 rows use the POSModule's pieces, stage-2 rows the MMModule's (which holds its own POS).
    module = cfg.mm_module() if what.startswith(("MM", "stage-2", "episode")) else cfg.pos_module()
    backbone = freeze(module.backbone.to(device))
    pos = module.pos.to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    if what == "backbone fwd":
        return lambda: _no_grad(backbone, images, amp=amp)

    if what == "POS fwd":
        with torch.no_grad():
            q_feats = backbone(images)
        return lambda: _no_grad(pos, q_feats, amp=amp)

    query_mask = (torch.rand(batch, size, size, device=device) > 0.5).long()
    if what == "stage-1 train step":
        crit = module.criterion
        opt = torch.optim.AdamW(pos.parameters(), lr=1e-4)
        semantic = torch.randint(0, 4, (batch, size, size), device=device)
        targets = [semantic_to_targets(s) for s in semantic]

        def step1() -> None:
            with amp():
                with torch.no_grad():  # the backbone is frozen in both stages
                    feats = backbone(images)
                losses = crit(pos(feats), targets, query_mask)
            opt.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt)
            scaler.update()

        return step1

    pos.requires_grad_(False).eval()  # stage 2 trains MM only
    mm = module.mm.to(device)
    supports = torch.randn(shot * batch, 3, size, size, device=device)
    support_masks = (torch.rand(batch, shot, size, size, device=device) > 0.5).long()
    if what.startswith("episode fwd"):  # a whole test episode: backbone on query and supports, POS, MM

        def episode() -> object:
            qf = backbone(images)
            sf = _split_shots(backbone(supports), shot)
            lg = pos(qf)["pred_masks"]
            return mm(qf, sf, support_masks, lg.float(), image_size=(size, size))

        return lambda: _no_grad(episode, amp=amp)
    if what.startswith("MM fwd"):
        with torch.no_grad():
            q_feats = backbone(images)
            s_feats = _split_shots(backbone(supports), shot)
            logits = pos(q_feats)["pred_masks"]
        return lambda: _no_grad(
            lambda: mm(q_feats, s_feats, support_masks, logits, image_size=(size, size)), amp=amp
        )
    if what.startswith("stage-2 train step"):
        crit2 = module.criterion
        opt2 = torch.optim.AdamW(mm.parameters(), lr=1e-4)

        def step2() -> None:
            with amp():
                with torch.no_grad():
                    qf = backbone(images)
                    sf = _split_shots(backbone(supports), shot)
                    lg = pos(qf)["pred_masks"]
                losses = crit2(mm(qf, sf, support_masks, lg.float(), image_size=(size, size)), query_mask)
            opt2.zero_grad(set_to_none=True)
            scaler.scale(sum(losses.values())).backward()
            scaler.step(opt2)
            scaler.update()

        return step2
    raise ValueError(what)


def _no_grad(fn: Callable, *args: object, amp: Callable = contextlib.nullcontext) -> object:
    with torch.no_grad(), amp():
        return fn(*args)


def _measure(
    cfg: ModelConfig, size: int, batch: int, what: str, repeats: int, device_name: str, threads: int, q
) -> None:
    torch.set_num_threads(threads)
    idle_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # runtime and imports only
    device = torch.device(device_name)
    fn = _row_fn(cfg, size, batch, what, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(fn, repeats, device)
    if device.type == "cuda":
        peak_mib, idle_mib = torch.cuda.max_memory_allocated() / 2**20, 0.0
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    q.put((seconds, peak_mib, idle_mib))


def backbone_configs() -> dict[str, dict]:
    """``{label: backbone configuration}``: the paper's ResNet-50, then every backbone_<name>.yaml."""
    configs = {"resnet50 (paper default)": {"name": "resnet50"}}
    for path in sorted(config_dir().glob("backbone_*.yaml")):
        configs[path.stem.removeprefix("backbone_")] = _init_args(path.name)["backbone"]
    return configs


def _measure_backbone(backbone: dict, size: int, batch: int, repeats: int, device_name: str, threads: int, q):
    torch.set_num_threads(threads)
    idle_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = build_backbone(
        backbone["name"], weights=None, frozen_bn=True, pyramid_channels=backbone.get("pyramid_channels", 256)
    )
    params = sum(p.numel() for p in model.parameters())
    new = sum(
        p.numel() for n in getattr(model, "new_modules", ()) for p in model.get_submodule(n).parameters()
    )
    model = freeze(model.to(device))
    images = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(lambda: _no_grad(model, images), repeats, device)
    if device.type == "cuda":
        peak_mib, idle_mib = torch.cuda.max_memory_allocated() / 2**20, 0.0
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q.put((params, new, dict(model.out_channels), seconds, peak_mib, idle_mib))


def run_backbone_row(backbone: dict, size: int, batch: int, repeats: int, device: str, threads: int) -> tuple:
    """``(parameters, new parameters, out_channels, median s, peak MiB, idle MiB)``, in a fresh process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure_backbone, args=(backbone, size, batch, repeats, device, threads, q))
    p.start()
    result = q.get()
    p.join()
    return result


def print_backbones(sizes: list[int], batch: int, repeats: int, device: str, threads: int) -> None:
    print(f"\nBackbones (random init, frozen, no_grad forward of {batch} image(s))")
    print("| config | name | params (M) | new (M) | res2..res5 channels | size | fwd (ms) | peak mem (MiB) |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for label, backbone in backbone_configs().items():
        for size in sizes:
            params, new, channels, seconds, peak, _ = run_backbone_row(
                backbone, size, batch, repeats, device, threads
            )
            widths = "/".join(str(c) for c in channels.values())
            print(
                f"| {label} | {backbone['name']} | {params / 1e6:.1f} | {new / 1e6:.1f} | {widths} | "
                f"{size} | {seconds * 1e3:.0f} | {peak:.0f} |",
                flush=True,
            )


def run_row(
    cfg: ModelConfig, size: int, batch: int, what: str, repeats: int, device: str, threads: int
) -> tuple[float, float, float]:
    """``(median seconds, peak MiB, idle MiB)`` of one row, measured in a fresh process.

    idle = peak RSS of that process before the row built anything (CPU only; 0 on CUDA).
    """
    # spawn, not fork: a forked child inherits the parent's peak RSS (and its OpenMP / CUDA state).
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(cfg, size, batch, what, repeats, device, threads, q))
    p.start()
    result = q.get()
    p.join()
    return result


def deform_attn_rows(
    repeats: int, device: torch.device, batch: int, size: int = 480
) -> list[tuple[str, float, float]]:
    """``(implementation, forward s, forward+backward s)`` at the pixel-decoder size of a ``size`` image.

    Levels at strides 32/16/8 (15x15, 30x30, 60x60 for 480), 8 heads of D=32, 4 points, one query per
    pixel of every level (the encoder's self-attention), locations in [0, 1]. Implementations alternate
    round by round so that a change of machine load hits all of them alike.
    """
    torch.manual_seed(0)
    heads, dim, points = 8, 32, 4
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, dim, device=device)
    locs = torch.rand(batch, tokens, heads, len(shapes), points, 2, device=device)
    weights = torch.rand(batch, tokens, heads, len(shapes), points, device=device).softmax(-1)
    grads = [t.clone().requires_grad_() for t in (value, locs, weights)]

    def fwd(impl: str) -> None:
        with torch.no_grad():
            ms_deform_attn_core(value, shapes, locs, weights, impl=impl)

    def fwd_bwd(impl: str) -> None:
        for t in grads:
            t.grad = None
        ms_deform_attn_core(grads[0], shapes, grads[1], grads[2], impl=impl).sum().backward()

    order = ("loop", *[i for i in IMPLEMENTATIONS if i != "loop"])
    samples: dict[str, tuple[list[float], list[float]]] = {impl: ([], []) for impl in order}
    for impl in order:  # warm-up
        fwd(impl)
        fwd_bwd(impl)
    for _ in range(repeats):
        for impl in order:
            samples[impl][0].append(_time(lambda impl=impl: fwd(impl), 1, device, warmup=False))
            samples[impl][1].append(_time(lambda impl=impl: fwd_bwd(impl), 1, device, warmup=False))
    return [(impl, statistics.median(f), statistics.median(fb)) for impl, (f, fb) in samples.items()]


def print_deform_attn(repeats: int, device: torch.device, batches: list[int]) -> None:
    default = default_impl(device)
    print(
        "\nMulti-scale deformable attention core, pixel decoder at 480x480: levels 15x15/30x30/60x60, "
        f"8 heads, D=32, 4 points, Lq = 4725; default on {device.type}: {default}"
    )
    print("| batch | implementation | fwd (ms) | fwd+bwd (ms) | fwd vs loop | fwd+bwd vs loop |")
    print("|---:|---|---:|---:|---:|---:|")
    names = {"loop": "per-level loop (baseline)", "grid_sample": "grid_sample", "gather": "gather"}
    for batch in batches:
        rows = deform_attn_rows(repeats, device, batch)
        base_f, base_fb = rows[0][1], rows[0][2]
        for impl, f, fb in rows:
            label = names[impl] + (" (default)" if impl == default else "")
            print(
                f"| {batch} | {label} | {f * 1e3:.1f} | {fb * 1e3:.1f} | "
                f"{base_f / f:.2f}x | {base_fb / fb:.2f}x |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[480, 128])
    parser.add_argument("--batch", type=int, default=1, help="batch of the model rows")
    parser.add_argument("--attn-batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["models", "attn", "backbones"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"device={args.device} threads={args.threads} batch={args.batch} repeats={args.repeats} "
        f"torch={torch.__version__}"
    )
    if args.only == "backbones":
        print_backbones(args.sizes, args.batch, args.repeats, args.device, args.threads)
        return
    if args.only != "attn":
        print("| model | size | what | time (ms) | peak mem (MiB) | idle process (MiB) |")
        print("|---|---|---|---:|---:|---:|")
        for size in args.sizes:
            # The paper model at the demo size and the demo model at 480 are not interesting configurations.
            cfg = PAPER if size >= 320 else DEMO
            for what in ROWS:
                seconds, peak, idle = run_row(
                    cfg, size, args.batch, what, args.repeats, args.device, args.threads
                )
                print(
                    f"| {cfg.name} | {size} | {what} | {seconds * 1e3:.1f} | {peak:.0f} | {idle:.0f} |",
                    flush=True,
                )
    if args.only != "models":
        print_deform_attn(args.repeats, torch.device(args.device), args.attn_batches)
    if args.only is None:
        print_backbones(args.sizes[:1], args.batch, args.repeats, args.device, args.threads)


if __name__ == "__main__":
    main()
