"""Loggers: Lightning's ``WandbLogger`` without the setting that makes wandb warn on every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


class WandbLogger(_WandbLogger):
    """``pytorch_lightning.loggers.WandbLogger`` without two warnings wandb prints on every run.

    * Lightning always passes ``anonymous=None`` to ``wandb.init``, and wandb >= 0.19 then prints
      "The anonymous setting has no effect": the setting is left unset.
    * wandb looks for the git repository of its ``dir`` (the logger's ``save_dir``) before anything
      created it and prints "git root ... does not exist": the folder is created first.

    Same arguments as Lightning's class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if self._wandb_init.get("dir"):
            Path(self._wandb_init["dir"]).mkdir(parents=True, exist_ok=True)
