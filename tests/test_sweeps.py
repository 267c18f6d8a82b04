"""W&B sweep files: each parses, a sampled parameter set gives a command line the CLI runs."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml
from cli_helpers import CONFIGS, run_dir_args, tiny_data

from fewshot_seg.cli import main

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))
REPO = CONFIGS.parent


def sample(params: dict, rng: random.Random) -> dict:
    """One draw per parameter, for the distributions the sweep files use."""
    out = {}
    for key, spec in params.items():
        if "value" in spec:
            out[key] = spec["value"]
        elif "values" in spec:
            out[key] = rng.choice(spec["values"])
        elif spec.get("distribution") == "log_uniform_values":
            out[key] = math.exp(rng.uniform(math.log(spec["min"]), math.log(spec["max"])))
        elif spec.get("distribution", "uniform") == "uniform":
            out[key] = rng.uniform(spec["min"], spec["max"])
        else:
            raise AssertionError(f"sampler does not know {spec}")
    return out


def command_args(sweep: dict, values: dict) -> list[str]:
    """The agent's command with ``${args}`` expanded to ``--key=value`` (program name dropped)."""
    args: list[str] = []
    for item in sweep["command"]:
        if item == "${args}":
            args += [f"--{k}={v}" for k, v in values.items()]
        else:
            args.append(str(REPO / item) if item.endswith(".yaml") else item)
    assert args[0] == "fewshot-seg"
    return args[1:]


@pytest.fixture(autouse=True)
def _wandb_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_is_valid(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("random", "grid", "bayes")
    assert sweep["metric"]["name"].startswith("val/")
    assert "${args}" in sweep["command"]
    args = command_args(sweep, sample(sweep["parameters"], random.Random(0)))
    assert args[0] == "fit"
    # Every sampled key is a real CLI option (parse + validate only).
    with pytest.raises(SystemExit) as exc:
        main([*args, "--print_config"])
    assert exc.value.code == 0


def test_demo_sweep_runs(synthetic_root: Path, tmp_path: Path) -> None:
    sweep = yaml.safe_load((CONFIGS / "sweeps" / "stage1_pos_cpu_demo.yaml").read_text())
    values = sample(sweep["parameters"], random.Random(1))
    cli = main(
        [
            *command_args(sweep, values),
            *tiny_data(synthetic_root),
            *run_dir_args(tmp_path / "runs"),
            "--model.init_args.loss.num_points=256",
            "--trainer.fast_dev_run=true",
        ]
    )
    assert cli.trainer.global_step == 1
    for key, v in values.items():  # model.init_args.<group>.<field>
        group, field = key.split(".")[-2:]
        assert cli.model.hparams[group][field] == pytest.approx(v)
