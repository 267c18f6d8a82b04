"""The LightningDataModule shared by the dataset-specific ones: folds, pools, lists, loaders."""

from __future__ import annotations

import hashlib
import warnings
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from fewshot_seg.contracts import model_global_batch, model_trains_with_supports
from fewshot_seg.episode import collate_episodes

from .episode_lists import episode_list_path, load_or_make_episode_list
from .episodes import ListEpisodeDataset, TrainEpisodeDataset
from .errors import DatasetError
from .protocols import Episode, ProtocolName, get_protocol
from .sampling import TrainLoader, TrainStepSampler
from .source import SegmentationSource, build_pools, check_pools
from .transforms import TestTransform, TrainAugment, default_support_min_pixels

EVAL_SPLITS = ("val", "test")
"""The splits with a saved episode list."""


class HParam:
    """A read-only DataModule attribute that is its saved hyper-parameter of the same name.

    ``save_hyperparameters()`` records every constructor argument once; these attributes read them from
    there instead of keeping a second copy that could drift from what checkpoints and loggers record.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: pl.LightningDataModule | None, objtype: type | None = None) -> Any:
        return self if obj is None else obj.hparams[self.name]

    def __set__(self, obj: pl.LightningDataModule, value: Any) -> None:
        raise AttributeError(
            f"{self.name} is a constructor argument of {type(obj).__name__}: build another one"
        )


class EpisodeDataModule(pl.LightningDataModule):
    """Few-shot episodes from a dataset split into folds of novel classes (SPEC §5).

    Subclasses say where images and labels are (:meth:`make_source`) and which classes are novel
    in a fold (:meth:`fold_novel_classes`); sampling, transforms, caching and loaders live here.
    """

    name: str = "episodes"
    num_classes: int = 0
    num_folds: int = 4
    class_names: tuple[str, ...] = ()
    test_only: bool = False
    """A test set without training classes (cross-domain, transfer): ``base_classes`` is empty and
    training episodes are refused; ``fold_novel_classes`` are the dataset's classes."""

    def __init__(
        self,
        root: str,
        fold: int = 0,
        shot: int = 1,
        image_size: int = 480,
        batch_size: int | None = None,
        num_workers: int = 4,
        test_episodes: int = 1000,
        val_episodes: int = 1000,
        seed: int = 0,
        test_seed: int = 321,
        val_seed: int = 123,
        protocol: ProtocolName = "spec",
        train_scales: list[int] | None = None,
        train_episodes: int | None = None,
        support_min_pixels: int | None = None,
        pool_min_pixels: int = 2048,
        max_shot: int = 5,
        cache_dir: str | None = None,
        episode_list_dir: str | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool = False,
        image_resize: Literal["cv2", "pil"] | None = None,
    ) -> None:
        """Arguments shared by every episode DataModule (subclasses add their own and pass these on).

        Args:
            root: Dataset folder (its layout is the subclass's).
            fold: Fold; its classes are novel (never seen in training).
            shot: Supports per episode (K), 1..``max_shot``.
            image_size: Side of the square model input (training crop and test resize).
            batch_size: Training episodes per batch *per process*. None = the model's global batch
                (``optim.batch_size``: 8 in stage 1, 4 in stage 2) divided by the number of processes,
                or 8 without a model.
            num_workers: DataLoader worker processes (episodes do not depend on it).
            test_episodes: Episodes of the fixed test list.
            val_episodes: Episodes of the validation list (test images, other seed than the test list).
            seed: Seed of training episodes: episode i depends only on (seed, i).
            test_seed: Seed of the test episode list.
            val_seed: Seed of the validation episode list.
            protocol: Evaluation protocol of the test and validation episodes (``datamodules.protocols``):
                "spec" (SPEC §5 episodes; keep aspect, scored at the original label size), "square480"
                (the same episodes stretched to image_size squares and scored there) or "mmformer" (the
                authors' sampler: every test image a query about equally often, class among all novel
                classes present, scored at image_size squares); the benchmark protocols "hsnet_fss",
                "patnet" and "lvis92i" are described in docs/benchmarks.md.
            train_scales: Shortest-edge scales of training resizes; default SPEC's 320..960 step 64
                scaled by image_size / 480.
            train_episodes: Training episodes per epoch; default = number of training query images.
            support_min_pixels: Pixels of the class a training support crop must keep; default
                1,843 at 480 scaled by (image_size / 480)^2.
            pool_min_pixels: Pixels of a class in the original label for the image to enter the class
                pool (PFENet's 2 * 32 * 32).
            max_shot: Supports stored per listed episode; the K-shot episode uses the first K.
            cache_dir: Where class-count caches go; default ``<root>/fewshot_cache``.
            episode_list_dir: Where episode lists go; default ``<cache_dir>/episodes``.
            eval_batch_size: Batch size of validation/test loaders; default the training batch size.
            pin_memory: Pin loader memory (faster host-to-GPU copies).
            image_resize: How validation/test images are resized: "cv2" (OpenCV bilinear, no
                antialiasing) or "pil" (torchvision ``Resize`` of the PIL image, antialiased bilinear:
                the published HSNet / PATNet / Matcher loaders). None = the protocol's (``pil`` for
                "hsnet_fss", "patnet" and "lvis92i", ``cv2`` otherwise). Training augmentation is
                unaffected.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= fold < self.num_folds:
            raise DatasetError(f"fold must be in 0..{self.num_folds - 1}, got {fold}")
        if not 1 <= shot <= max_shot:
            raise DatasetError(
                f"shot must be in 1..max_shot={max_shot}, got {shot} (raise max_shot for more)"
            )
        if image_size < 8:
            raise DatasetError(f"image_size must be at least 8, got {image_size}")
        self.eval_protocol = get_protocol(protocol)
        if image_resize not in (None, "cv2", "pil"):
            raise DatasetError(
                f"image_resize must be 'cv2' or 'pil' (or null for the protocol's), got {image_resize!r}"
            )
        self.image_resize = image_resize or self.eval_protocol.image_resize
        for arg, value in (("test_episodes", test_episodes), ("val_episodes", val_episodes)):
            if value is not None and value < 1:  # None: the protocol's own count (e.g. FSS-1000)
                raise DatasetError(f"{arg} must be at least 1, got {value}")
        if batch_size is not None and batch_size < 1:
            raise DatasetError(f"batch_size must be positive (or null for the model's), got {batch_size}")
        # The arguments themselves are read from self.hparams (HParam below); only derived values here.
        self.root = Path(root)
        self.support_min_pixels = (
            support_min_pixels if support_min_pixels is not None else default_support_min_pixels(image_size)
        )
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "fewshot_cache"
        self.episode_list_dir = Path(episode_list_dir) if episode_list_dir else self.cache_dir / "episodes"
        self._sources: dict[str, SegmentationSource] = {}
        self._train: TrainEpisodeDataset | None = None
        self._val: ListEpisodeDataset | None = None
        self._test: ListEpisodeDataset | None = None

    fold = HParam()
    shot = HParam()
    image_size = HParam()
    batch_size = HParam()
    num_workers = HParam()
    test_episodes = HParam()
    val_episodes = HParam()
    seed = HParam()
    test_seed = HParam()
    val_seed = HParam()
    protocol = HParam()
    train_scales = HParam()
    train_episodes = HParam()
    pool_min_pixels = HParam()
    max_shot = HParam()
    eval_batch_size = HParam()
    pin_memory = HParam()

    # ---- batch size -----------------------------------------------------------------------------
    @property
    def train_batch_size(self) -> int:
        """Training episodes per batch in this process (see ``batch_size``)."""
        return self.batch_size if self.batch_size is not None else resolve_batch_size(self.trainer)

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.train_batch_size

    # ---- what a dataset defines -------------------------------------------------------------
    @abstractmethod
    def fold_novel_classes(self, fold: int) -> list[int]:
        """Sorted 1-based novel class ids of ``fold``."""

    @abstractmethod
    def make_source(self, split: str) -> SegmentationSource:
        """The images and labels of ``split``: "train" (training images) or "test" (test images)."""

    # ---- classes ---------------------------------------------------------------------------------
    @property
    def novel_classes(self) -> list[int]:
        return sorted(self.fold_novel_classes(self.fold))

    @property
    def base_classes(self) -> list[int]:
        if self.test_only:
            return []
        novel = set(self.novel_classes)
        return [c for c in range(1, self.num_classes + 1) if c not in novel]

    def class_name(self, c: int) -> str:
        return self.class_names[c - 1] if 0 < c <= len(self.class_names) else str(c)

    def provenance(self) -> dict[str, Any]:
        """What this DataModule serves, as recorded in checkpoints and results (``lightning.provenance``)."""
        lists = {}
        for split in ("val", "test"):
            path = self.episode_list_file(split)
            lists[split] = {
                "file": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
            }
        return {
            "dataset": self.name,
            "datamodule": type(self).__name__,
            "root": str(self.root),
            "fold": self.fold,
            "shot": self.shot,
            "base_classes": self.base_classes,
            "novel_classes": self.novel_classes,
            "class_names": {str(c): self.class_name(c) for c in range(1, self.num_classes + 1)},
            "image_size": self.image_size,
            "protocol": self.eval_protocol.name,
            "seeds": {"train": self.seed, "test": self.test_seed, "val": self.val_seed},
            "pool_min_pixels": self.pool_min_pixels,
            "episode_lists": lists,
            # Recorded where it is not the plain OpenCV resize (older records have none: "cv2").
            **({"image_resize": self.image_resize} if self.image_resize != "cv2" else {}),
        }

    # ---- sources, pools --------------------------------------------------------------------------
    def source(self, split: str) -> SegmentationSource:
        if split not in self._sources:
            self._sources[split] = self.make_source(split)
        return self._sources[split]

    def class_counts(self, split: str) -> dict[str, dict[int, int]]:
        """Per-image class pixel counts of ``split``, computed once and cached in ``cache_dir``."""
        return self.source(split).class_counts(
            self.cache_dir / f"{self.name}_{split}_class_counts.json", f"{self.name} {split}"
        )

    def pools(self, split: str, classes: list[int]) -> dict[int, list[str]]:
        """Class pools of ``split`` by the pixel rule, from cached per-image class counts."""
        return build_pools(self.class_counts(split), classes, self.pool_min_pixels)

    def _names(self) -> dict[int, str]:
        return {i + 1: n for i, n in enumerate(self.class_names)}

    # ---- datasets ------------------------------------------------------------------------------
    def training_shot(self) -> int:
        """Supports per training episode: ``shot``, or 0 for a model that trains on the query alone.

        Stage 1 then reads no support (and its query/class stream, which comes first in every
        episode's random stream, is the same for any ``shot``).
        """
        return self.shot if model_trains_with_supports(self.trainer) else 0

    def train_pools(self) -> dict[int, list[str]]:
        """Base-class pools of the training images, each checked to hold a query plus the training
        episode's supports."""
        pools = self.pools("train", self.base_classes)
        check_pools(pools, self.training_shot(), self.pools_description("training"), self._names())
        return pools

    def pools_description(self, split: str) -> str:
        """How a pool error names the data: ``<name> fold <F> <split>`` ("training" or "test")."""
        return f"{self.name} fold {self.fold} {split}"

    def eval_images(self, split: str) -> str:
        """The source ("test", or a DataModule's own validation images) whose images ``split`` lists."""
        return "test"

    def train_dataset(self) -> TrainEpisodeDataset:
        if self.test_only:
            raise DatasetError(
                f"{self.name} is test-only: models are trained on Pascal-5i or COCO-20i (or another "
                "dataset with training classes) and tested here"
            )
        pools = self.train_pools()
        return TrainEpisodeDataset(
            self.source("train"),
            pools,
            self.novel_classes,
            self.training_shot(),
            TrainAugment(self.image_size, self.train_scales),
            self.support_min_pixels,
            self.seed,
            self.train_episodes,
        )

    def episode_count_and_seed(self, split: str) -> tuple[int, int]:
        """(episodes, seed) of the "test" or "val" list."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"episode lists exist for the splits {EVAL_SPLITS}, not {split!r}")
        return (self.test_episodes, self.test_seed) if split == "test" else (self.val_episodes, self.val_seed)

    def episode_list_file(self, split: str) -> Path:
        """The saved "test" or "val" episode list of this fold and protocol."""
        num, seed = self.episode_count_and_seed(split)
        return episode_list_path(
            self.episode_list_dir,
            self.list_name,
            self.fold,
            split,
            num,
            seed,
            self.max_shot,
            self.eval_protocol,
        )

    @property
    def list_name(self) -> str:
        """Dataset part of the episode-list file names: ``name``; a DataModule whose fold classes follow
        another rule on request adds a tag, so the two lists do not overwrite each other."""
        return self.name

    def episode_list(self, split: str) -> list[Episode]:
        """The saved "test" or "val" list of novel-class episodes on the test images (drawn once)."""
        num, seed = self.episode_count_and_seed(split)
        images = self.eval_images(split)
        pools = self.pools(images, self.novel_classes)
        if self.eval_protocol.draws == "spec":
            check_pools(pools, self.shot, self.pools_description(images), self._names())
        return load_or_make_episode_list(
            self.episode_list_file(split),
            self.eval_protocol,
            pools,
            self.class_counts(images),
            num,
            self.max_shot,
            seed,
        )

    def eval_dataset(self, split: str) -> ListEpisodeDataset:
        return ListEpisodeDataset(
            self.source(self.eval_images(split)),
            self.episode_list(split),
            self.shot,
            self.novel_classes,
            TestTransform(self.image_size, self.eval_protocol.square, self.image_resize),
        )

    # ---- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._train = self.train_dataset()
        if stage in (None, "fit", "validate"):
            self._val = self.eval_dataset("val")
        if stage in (None, "test", "predict"):
            self._test = self.eval_dataset("test")

    def _loader(
        self, dataset: Dataset, batch_size: int, sampler: Sampler | None, cls: type = DataLoader
    ) -> DataLoader:
        return cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_episodes,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _train_position(self) -> tuple[int, int, int]:
        """(batches done by each process, rank, world size) of the attached Trainer."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 1
        return trainer.global_step * trainer.accumulate_grad_batches, trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        """Training episodes keyed by step and rank (:class:`~datamodules.sampling.TrainStepSampler`)."""
        if self._train is None:
            self.setup("fit")
        batch = self.train_batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        model_batch = model_global_batch(self.trainer)
        if (
            self.batch_size is not None
            and model_batch is not None
            and batch * world * accumulate != model_batch
        ):
            warnings.warn(
                f"global batch = data batch_size {batch} x {world} process(es) x {accumulate} accumulated = "
                f"{batch * world * accumulate} episodes per step, but the model's optim.batch_size is "
                f"{model_batch} (the paper's in the paper configs): leave data batch_size unset to "
                "split the model's global batch over the processes",
                stacklevel=2,
            )
        # An epoch is len(train dataset) episodes over all processes, in whole optimisation steps.
        batches = max(1, len(self._train) // (batch * world * accumulate)) * accumulate
        sampler = TrainStepSampler(batch, batches, self._train_position)
        return self._loader(self._train, batch, sampler, cls=TrainLoader)

    def val_dataloader(self) -> DataLoader:
        if self._val is None:
            self.setup("validate")
        return self._loader(self._val, self.eval_batch, _unpadded_shard_sampler(self._val))

    def test_dataloader(self) -> DataLoader:
        if self._test is None:
            self.setup("test")
        return self._loader(self._test, self.eval_batch, _unpadded_shard_sampler(self._test))

    def predict_dataloader(self) -> DataLoader:
        """The test episodes (``predict`` writes a mask and an overlay per episode)."""
        return self.test_dataloader()


DEFAULT_BATCH_SIZE = 8
"""Per-process training batch of a DataModule used without a Trainer and without a ``batch_size``."""


def resolve_batch_size(trainer: pl.Trainer | None) -> int:
    """The model's global batch (``optim.batch_size``) divided by processes x accumulated batches.

    So an optimisation step holds the global batch whatever ``--trainer.devices``, ``--trainer.num_nodes``
    and ``--trainer.accumulate_grad_batches`` are.

    Raises:
        DatasetError: the global batch cannot be split evenly (the message names both numbers).
    """
    global_batch = model_global_batch(trainer)  # the contract fewshot_seg.contracts describes
    if global_batch is None:
        return DEFAULT_BATCH_SIZE
    world = max(1, int(trainer.world_size))
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1)))
    if global_batch % (world * accumulate):
        raise DatasetError(
            f"the model's global batch optim.batch_size={global_batch} cannot be split over {world} "
            f"process(es) x {accumulate} accumulated batch(es): set --model.init_args.optim.batch_size to a "
            "multiple of their product, or --data.init_args.batch_size (per process) explicitly"
        )
    return global_batch // (world * accumulate)


def _unpadded_shard_sampler(dataset: Dataset) -> Sampler | None:
    """Under multi-process DDP, every process its own episodes, each episode exactly once.

    Lightning's default DistributedSampler pads the list with repeated episodes to make equal
    shards; a repeated episode would be counted twice by the summed test metric. Being a
    DistributedSampler, this one is kept by Lightning as is. None (sequential) in a single process.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, shuffle=False)
