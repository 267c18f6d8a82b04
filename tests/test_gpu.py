"""CUDA checks (``pytest -m gpu``; skipped without a CUDA device) and the CPU smoke run of gpu_check.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from cli_helpers import GEN

from fewshot_seg.config import BackboneConfig, MaskMatchingConfig, OptimizerConfig, POSConfig, POSLossConfig
from fewshot_seg.lightning import MMModule, POSModule

REPO = Path(__file__).resolve().parents[1]
SMALL_POS = POSConfig(
    num_queries=20, dim=64, heads=4, enc_layers=2, enc_ffn=128, dec_layers=3, dec_ffn=256, norm_groups=8
)
BF16_TOLERANCE = 0.02
"""Relative L2 error of bf16-mixed outputs against fp32 (the pixel decoder and deformable attention
run in fp32 under autocast; the transformer decoder and Mask Matching in bf16)."""


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.gpu
def test_bf16_autocast_agrees_with_fp32() -> None:
    torch.manual_seed(0)
    model = MMModule(
        backbone=BackboneConfig(name="resnet18", weights=None), pos=SMALL_POS, mm=MaskMatchingConfig(dim=64)
    ).cuda()
    images = torch.randn(2, 3, 128, 128, device="cuda")
    with torch.no_grad():
        feats = model.backbone(images)
        fp32 = model.pos(feats)["pred_masks"]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.pos(feats)["pred_masks"]
    assert _relative(bf16, fp32) < BF16_TOLERANCE


@pytest.mark.gpu
def test_frozen_modules_stay_frozen_under_amp(synthetic_root: Path, tmp_path: Path) -> None:
    from datamodules import SyntheticDataModule

    torch.manual_seed(0)
    model = POSModule(
        backbone=BackboneConfig(name="resnet18", weights=None, freeze=True, frozen_bn=False),
        pos=SMALL_POS,
        loss=POSLossConfig(num_points=256),
        optim=OptimizerConfig(lr=1e-3),
    )
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    dm = SyntheticDataModule(
        root=str(synthetic_root), image_size=64, batch_size=2, num_workers=0, pool_min_pixels=50, **GEN
    )
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    after = model.state_dict()
    for k, v in before.items():  # weights and BatchNorm statistics
        assert torch.equal(v, after[k].cpu()), k


@pytest.mark.gpu
def test_uint8_batch_normalised_on_cuda_as_on_cpu(synthetic_root: Path, tmp_path: Path) -> None:
    """Loaders ship uint8 (pinned here, as the GPU configs do); the model's device makes the inputs."""
    from datamodules import SyntheticDataModule

    dm = SyntheticDataModule(
        root=str(synthetic_root), image_size=64, batch_size=2, num_workers=1, pool_min_pixels=50,
        pin_memory=True, cache_dir=str(tmp_path / "cache"), **GEN,
    )  # fmt: skip
    batch = next(iter(dm.train_dataloader()))
    assert batch.query_image.dtype == torch.uint8 and batch.query_image.is_pinned()
    on_cpu, on_gpu = batch.normalized(), batch.to("cuda").normalized()
    assert on_gpu.query_image.is_cuda and on_gpu.query_mask.dtype == torch.int64
    assert (on_gpu.query_image.cpu() - on_cpu.query_image).abs().max() <= 1e-6
    assert (on_gpu.support_images.cpu() - on_cpu.support_images).abs().max() <= 1e-6
    for name in ("query_mask", "support_masks", "query_semantic"):
        assert torch.equal(getattr(on_gpu, name).cpu(), getattr(on_cpu, name)), name


def test_gpu_check_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "gpu_check.py"),
            "--smoke",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for title in (
        "## Training step",
        "## Inference",
        "## Deformable attention",
        "## Backbones",
        "## fewshot-seg fit + fit + test",
        "## Where a stage-1 step spends its time",
        "## Host overhead per phase",
        "## Segmenter: eager vs CUDA graphs",
    ):
        assert title in text
    assert "| dinov2_vitb14 | timm:vit_small_patch14_dinov2 |" in text
    assert "| stage-1 train step | 8 | bf16-mixed |" in text and "all finite" in text and "mIoU" in text
