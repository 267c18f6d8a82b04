"""Parameter groups and the poly schedule (SPEC §4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot_seg.config import OptimizerConfig
from fewshot_seg.lightning.optim import build_optimizer, param_groups, resolve_max_steps


class _CustomFrozenNorm(nn.Module):
    """Stands for any norm class that is not a torch subclass (matched by name)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.custom = _CustomFrozenNorm(4)
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))
        self.linear = nn.Linear(4, 4)
        self.shared = self.linear  # the same parameters twice
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def _wd_by_param(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_no_decay_on_norms_and_embeddings() -> None:
    model = _Toy()
    groups = param_groups(model, lr=1e-4, weight_decay=0.05)
    wd = _wd_by_param(groups)
    zero = [
        model.backbone[1].weight,
        model.backbone[1].bias,
        model.gn.weight,
        model.gn.bias,
        model.ln.weight,
        model.inorm.weight,
        model.custom.weight,
        model.query_feat.weight,
        model.level_embed,
    ]
    decayed = [
        model.backbone[0].weight,
        model.backbone[0].bias,
        model.conv.weight,
        model.linear.weight,
        model.linear.bias,
    ]
    for p in zero:
        assert wd[id(p)] == 0.0
    for p in decayed:
        assert wd[id(p)] == 0.05
    # Frozen parameters are not optimised; shared ones appear once.
    assert id(model.frozen.weight) not in wd
    all_params = [p for g in groups for p in g["params"]]
    assert len(all_params) == len({id(p) for p in all_params})
    assert len(all_params) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_multiplier_by_prefix() -> None:
    model = _Toy()
    groups = param_groups(model, lr=1e-4, lr_mult={"backbone": 0.1})
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr[id(model.backbone[0].weight)] == pytest.approx(1e-5)
    assert lr[id(model.backbone[1].weight)] == pytest.approx(1e-5)
    assert lr[id(model.conv.weight)] == pytest.approx(1e-4)


def test_nothing_trainable_is_an_error() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model, lr=1e-4)


def test_poly_schedule_per_step() -> None:
    model = nn.Linear(2, 2)
    cfg = build_optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.05), max_steps=10)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-4 * (1 - s / 10) ** 0.9 for s in range(10)]
    assert lrs == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == 0.0
    opt.step()
    sched.step()  # past the end it stays 0
    assert opt.param_groups[0]["lr"] == 0.0
    with pytest.raises(ValueError, match="max_steps"):
        build_optimizer(model, OptimizerConfig(), max_steps=0)


def test_resolve_max_steps() -> None:
    class _T:
        estimated_stepping_batches = 37

    assert resolve_max_steps(5, _T()) == 5
    assert resolve_max_steps(None, _T()) == 37
    _T.estimated_stepping_batches = float("inf")
    with pytest.raises(ValueError, match="max_steps"):
        resolve_max_steps(None, _T())


def test_backbone_weights_null_from_the_command_line_is_none() -> None:
    from fewshot_seg.config import BackboneConfig

    # jsonargparse passes `--model.init_args.backbone.weights=null` as the string "None".
    assert BackboneConfig(weights="None").weights is None and BackboneConfig(weights="null").weights is None
    assert BackboneConfig(weights="imagenet").weights == "imagenet"


def _adamw_run(opt_class: type, start: list[torch.Tensor], steps: int, reload_at: int | None = None) -> list:
    """Params after ``steps`` steps of two groups (decay, no decay) with a poly schedule; the third
    parameter has no gradient at step 1 (its counter falls behind); optionally the optimiser is rebuilt
    from its state dict at ``reload_at``."""
    params = [p.clone().requires_grad_() for p in start]

    def build() -> torch.optim.Optimizer:
        groups = [
            {"params": params[:2], "weight_decay": 0.05},
            {"params": params[2:], "weight_decay": 0.0, "lr": 3e-4},
        ]
        return opt_class(groups, lr=1e-3, foreach=True)

    opt = build()
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
    grads = torch.Generator().manual_seed(1)
    for i in range(steps):
        if reload_at == i:
            state = opt.state_dict()
            opt = build()
            opt.load_state_dict(state)
            sched.optimizer = opt
        for j, p in enumerate(params):
            p.grad = None if (i == 1 and j == 2) else torch.randn(p.shape, generator=grads)
        opt.step()
        sched.step()
    return [*params, opt.state_dict()]


def test_adamw_reads_no_counter_per_step_and_keeps_torchs_bits() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from fewshot_seg.lightning.optim import AdamW

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in ((16, 8), (8,), (3, 3, 4), (5,))]
    for reload_at in (None, 3):
        ref = _adamw_run(torch.optim.AdamW, start, 6, reload_at)
        ours = _adamw_run(AdamW, start, 6, reload_at)
        assert all(torch.equal(a, b) for a, b in zip(ref[:-1], ours[:-1])), reload_at
        for k, state in ref[-1]["state"].items():  # the same state, counters included
            assert all(torch.equal(v, ours[-1]["state"][k][n]) for n, v in state.items())

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Reads.count += func.__name__.startswith("_local_scalar_dense")
            return func(*args, **(kwargs or {}))

    params = [p.clone().requires_grad_() for p in start]
    opt = AdamW(params, lr=1e-3, foreach=True)
    counts = []
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        Reads.count = 0
        with Reads():
            opt.step()
        counts.append(Reads.count)
    # The first step reads each new counter once; later steps read none (torch's reads 2 per parameter).
    assert counts == [len(params), 0, 0]


def test_adamw_leaves_other_configurations_to_torch() -> None:
    from fewshot_seg.lightning.optim import AdamW

    for make, kwargs in (
        (lambda: torch.randn(4, dtype=torch.complex64, generator=torch.Generator().manual_seed(0)), {}),
        (lambda: torch.randn(4, generator=torch.Generator().manual_seed(0)), {"amsgrad": True}),
    ):
        results = []
        for cls in (torch.optim.AdamW, AdamW):
            p = make().requires_grad_()
            opt = cls([p], lr=1e-2, foreach=True, **kwargs)
            for _ in range(3):
                p.grad = torch.ones_like(p)
                opt.step()
            results.append(p.detach())
        assert torch.equal(*results), kwargs
