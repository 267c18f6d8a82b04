"""Every user mistake gives one clear line naming the file, argument or annotation: no wall of traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import STAGE1, STAGE2, run_dir_args, tiny_data

from datamodules import DatasetError
from datamodules.coco import COCOSource
from datamodules.fake import make_fake_coco
from fewshot_seg import cli
from fewshot_seg.checkpoints import CheckpointError, read_checkpoint


def _console(monkeypatch: pytest.MonkeyPatch, capsys, *args: str) -> tuple[int, list[str]]:
    """Run the console script ``fewshot-seg <args>``; its exit code and the lines it printed on stderr."""
    monkeypatch.setattr(sys, "argv", ["fewshot-seg", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.entry_point()
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--data.init_args.fold=4", "error: fold must be in 0..3, got 4"),
        ("--data.init_args.shot=0", "error: shot must be in 1..max_shot=5, got 0 (raise max_shot for more)"),
        ("--data.init_args.test_episodes=0", "error: test_episodes must be at least 1, got 0"),
    ],
)
def test_bad_argument_is_one_line(
    arg: str, message: str, synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, err = _console(
        monkeypatch, capsys, "fit", *STAGE1, *tiny_data(synthetic_root), *run_dir_args(tmp_path), arg
    )
    assert code == 2 and err == [message]


def test_non_checkpoint_files_are_named(synthetic_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    code, err = _console(
        monkeypatch,
        capsys,
        "fit",
        *STAGE2,
        *tiny_data(synthetic_root),
        *run_dir_args(tmp_path),
        f"--model.init_args.stage1_checkpoint={text}",
    )
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: stage1_checkpoint '{text}' is not a readable PyTorch checkpoint")
    # A pickle holding code objects: refused without ever suggesting weights_only=False.
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Path("p")}, evil)
    with pytest.raises(CheckpointError, match="holds Python objects") as info:
        read_checkpoint(evil, "stage1_checkpoint")
    assert "weights_only=False" not in str(info.value)


def test_malformed_coco_entries_are_named(tmp_path: Path) -> None:
    root = make_fake_coco(tmp_path / "coco", per_class=1)
    ann = root / "annotations" / "instances_val2014.json"
    data = json.loads(ann.read_text())
    cases = [
        (lambda d: d["annotations"][0].pop("segmentation"), r"annotation 1 has no 'segmentation'"),
        (lambda d: d["images"][0].pop("height"), r"image 1000 has no 'height'"),
        (lambda d: d["annotations"][1].update(segmentation="oops"), r"annotation 2: 'segmentation' is a str"),
        (lambda d: d["annotations"][2].update(image_id=5), r"annotation 3 refers to unknown image 5"),
        (lambda d: d["annotations"][0].update(segmentation=[]), r"annotation 1 has an empty 'segmentation'"),
        (
            lambda d: d["annotations"][1].update(segmentation=[[]]),
            r"annotation 2: 'segmentation' polygon 0 is not a list of coordinates",
        ),
        (
            lambda d: d["annotations"][2].update(segmentation=[[1, 2, 3, 4]]),
            r"annotation 3: 'segmentation' has no polygon of at least 3 points",
        ),
    ]
    for break_it, message in cases:
        broken = json.loads(json.dumps(data))
        break_it(broken)
        ann.write_text(json.dumps(broken))
        with pytest.raises(DatasetError, match=rf"{ann}: {message}"):
            COCOSource(root, "val", 2014)


def test_empty_lvis_segmentation_is_named(tmp_path: Path) -> None:
    from datamodules.fake import make_fake_lvis
    from datamodules.lvis import LVISSource

    root = make_fake_lvis(tmp_path / "lvis")
    ann = root / "annotations" / "lvis_v1_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][4]["segmentation"] = []
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"^{ann}: annotation 5 has an empty 'segmentation'"):
        LVISSource(ann, root)


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_ckpt_path_missing_or_folder_is_one_line(
    kind: str, synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    path = tmp_path / "nothing.ckpt"
    if kind == "folder":
        path = tmp_path / "checkpoints"
        path.mkdir()
    message = {"missing": "does not exist", "folder": "is a folder; expected a .ckpt / .pth file"}[kind]
    for sub in ("fit", "test"):
        code, err = _console(
            monkeypatch,
            capsys,
            sub,
            *STAGE1,
            *tiny_data(synthetic_root),
            *run_dir_args(tmp_path / "out"),
            f"--ckpt_path={path}",
        )
        assert code == 2 and err == [f"error: --ckpt_path '{path}' {message}"], (sub, err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.init_args.pos.num_querys=3"],
            "error: --model.init_args.pos.num_querys: no such option of fewshot_seg.lightning.POSModule "
            "(did you mean --model.init_args.pos.num_queries?)",
        ),
        (
            ["--data.init_args.foldd=1"],
            "error: --data.init_args.foldd: no such option of datamodules.SyntheticDataModule "
            "(did you mean --data.init_args.fold?)",
        ),
        (
            ["--trainer.max_stepz=3"],
            "error: --trainer.max_stepz: no such option (did you mean --trainer.max_steps?)",
        ),
        (["--model=POSModul"], "error: --model: no class 'POSModul' (did you mean POSModule?)"),
        (
            ["--model.init_args.optim.lr=abc"],
            "error: --model.init_args.optim.lr: expected float, got 'abc'",
        ),
        (
            ["--data.init_args.protocol=patnett"],
            "error: --data.init_args.protocol: 'patnett' is not one of spec, square480, mmformer, hsnet_fss, "
            "patnet, lvis92i (did you mean patnet?)",
        ),
        (
            ["--data=SyntheticDataModul"],
            "error: --data: no class 'SyntheticDataModul' (did you mean SyntheticDataModule?)",
        ),
        (["--trainer.max_steps=abc"], "error: --trainer.max_steps: expected int, got 'abc'"),
    ],
)
def test_unknown_option_or_class_leads_with_the_cause(
    args: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    code, err = _console(monkeypatch, capsys, "fit", *STAGE1, *args)
    assert code == 2 and err == [message]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "timm:nonexistent",
            "error: --model.init_args.backbone.name: unknown timm model 'nonexistent'; "
            "`timm.list_models('*word*')` lists the names",
        ),
        (
            "timm:convnext_atoo",
            "error: --model.init_args.backbone.name: unknown timm model 'convnext_atoo' "
            "(did you mean timm:convnext_atto?); `timm.list_models('*word*')` lists the names",
        ),
        (
            "resnet5",
            "error: --model.init_args.backbone.name: unknown backbone 'resnet5'; choose from ['resnet101', "
            "'resnet18', 'resnet34', 'resnet50'] or a timm model as 'timm:<name>'",
        ),
    ],
)
def test_unknown_backbone_is_one_line_naming_the_argument(
    name: str, message: str, monkeypatch, capsys
) -> None:
    # Raised while the model is built, which jsonargparse reports in an 80-line union-type dump.
    code, err = _console(monkeypatch, capsys, "fit", *STAGE1, f"--model.init_args.backbone.name={name}")
    assert code == 2 and err == [message]


def test_config_file_typos_are_named(tmp_path: Path, monkeypatch, capsys) -> None:
    key = tmp_path / "key.yaml"
    key.write_text("model:\n  init_args:\n    pos:\n      num_querys: 3\n")
    code, err = _console(monkeypatch, capsys, "fit", *STAGE1, "-c", str(key))
    assert code == 2 and err == [
        "error: --model.init_args.pos.num_querys: no such option of fewshot_seg.lightning.POSModule "
        "(did you mean --model.init_args.pos.num_queries?)"
    ]
    cls = tmp_path / "cls.yaml"
    cls.write_text("model:\n  class_path: fewshot_seg.lightning.POSModul\n")
    code, err = _console(monkeypatch, capsys, "fit", *STAGE1, "-c", str(cls))
    assert code == 2 and err == [
        "error: --model: no class 'fewshot_seg.lightning.POSModul' "
        "(did you mean fewshot_seg.lightning.POSModule?)"
    ]


def test_yaml_with_a_tab_names_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    tab = tmp_path / "tab.yaml"
    tab.write_text("trainer:\n\tmax_steps: 3\n")
    for option in (["-c", str(tab)], [f"--config={tab}"]):
        code, err = _console(monkeypatch, capsys, "fit", *STAGE1, *option)
        assert code == 2 and err == [
            f"error: config {tab}: not valid YAML at line 2, column 1: found character '\\t' that cannot "
            "start any token (a tab: YAML indents with spaces only)"
        ]


@pytest.mark.parametrize(
    ("stage", "every", "what"),
    [
        (1, 2, r"non-finite model outputs \(pred_masks"),  # caught before the Hungarian matcher
        (
            1,
            1,
            r"non-finite model outputs \(oracle\) in validation",
        ),  # before a checkpoint is written
        (2, 2, r"non-finite model outputs \(foreground"),  # caught before the BCE
    ],
)
def test_non_finite_loss_stops_with_one_line(
    stage: int,
    every: int,
    what: str,
    synthetic_root: Path,
    stage1_ckpt: Path,
    tmp_path: Path,
    monkeypatch,
    capsys,
) -> None:
    import re

    stage_args = (
        [*STAGE1, "--model.init_args.loss.num_points=256"]
        if stage == 1
        else [*STAGE2, f"--model.init_args.stage1_checkpoint={stage1_ckpt}"]
    )
    code, err = _console(
        monkeypatch,
        capsys,
        "fit",
        *stage_args,
        *tiny_data(synthetic_root),
        *run_dir_args(tmp_path, "run"),
        "--model.init_args.optim.lr=1e30",
        "--trainer.max_steps=4",
        f"--trainer.val_check_interval={every}",
        "--trainer.enable_progress_bar=false",
    )
    errors = [line for line in err if line.startswith("error:") or "Traceback" in line]
    assert code == 2 and len(errors) == 1, err[-5:]
    assert re.match(rf"error: step 1: {what}.*lower the learning rate", errors[0]), errors[0]
    assert "--model.init_args.optim.lr" in errors[0] and "gradient_clip_val" in errors[0]
    # No checkpoint of diverged weights is ever written (a good one would be kept as it is).
    for path in tmp_path.rglob("*.ckpt"):
        weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), path


def test_diverged_weights_are_never_written(tmp_path: Path) -> None:
    from fewshot_seg.lightning.finite import NonFiniteError, check_weights

    model = torch.nn.Linear(2, 2)
    check_weights(model, 3, "last.ckpt")  # finite: nothing to say
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(
        NonFiniteError, match=r"^step 3: the weights hold non-finite values \(bias\); last.ckpt not"
    ):
        check_weights(model, 3, "last.ckpt")


def test_ckpt_path_not_a_project_checkpoint(
    synthetic_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import torchvision

    imagenet = tmp_path / "resnet18-imagenet.pth"  # what torchvision downloads: a bare state dict
    torch.save(torchvision.models.resnet18().state_dict(), imagenet)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world\nexample text\n")  # torch's unpickler raised KeyError: 101
    for path, message in (
        (imagenet, "is not an MM-Former checkpoint of this project"),
        (text, "is not a readable PyTorch checkpoint"),
    ):
        code, err = _console(
            monkeypatch,
            capsys,
            "test",
            *STAGE1,
            *tiny_data(synthetic_root),
            *run_dir_args(tmp_path / "out"),
            f"--ckpt_path={path}",
        )
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: --ckpt_path '{path}' {message}"), err
