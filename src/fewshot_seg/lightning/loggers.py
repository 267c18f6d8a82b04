"""Loggers: Lightning's ``WandbLogger`` without the setting that makes wandb warn on every run."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


class WandbLogger(_WandbLogger):
    """``pytorch_lightning.loggers.WandbLogger`` that leaves wandb's deprecated ``anonymous`` setting unset.

    Lightning always passes ``anonymous=None`` to ``wandb.init``, and wandb >= 0.19 then prints
    "The anonymous setting has no effect" on every run. Same arguments as Lightning's class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
