"""PATNet's cross-domain test sets: Deepglobe, ISIC-2018 and Chest X-ray (test-only, binary masks).

Models are trained on Pascal-5i or COCO-20i and tested here with PATNet's protocol (``patnet``: 600
episodes, classes in turn, scored at 400 x 400); see docs/benchmarks.md for the layouts and sources.
Testing a model trained elsewhere needs ``--model.init_args.allow_class_overlap=true`` (the class
names it may share with its training set are reported in results.json).
"""

from __future__ import annotations

from typing import Any

from .base import EpisodeDataModule
from .binary import BinaryMaskFolderSource, MaskedImage, files_with_suffix, pair_by_stem, require_dir
from .errors import DatasetError
from .protocols import ProtocolName
from .source import SegmentationSource

DEEPGLOBE_CLASSES = ("agriculture_land", "urban_land", "rangeland", "forest_land", "water", "barren_land")
"""Deepglobe class of PATNet's folders 1..6 (the colour order of PATNet ``data/preprocess.py``, named
with the DeepGlobe land-cover palette: yellow, cyan, magenta, green, blue, white)."""

ISIC_CLASSES = ("nevus", "melanoma", "seborrheic_keratosis")
"""Diagnosis of the ISIC folders 1, 2, 3. PATNet's code does not say; this is the mapping of the only
public sorting script, DMTNet's ``data/isic_preprocess.py`` (ChenJiayi68/DMTNet), which sorts PATNet's
``class_id.csv`` into folders 1 nevus, 2 melanoma, 3 seborrheic keratosis (docs/benchmarks.md).
Override with ``class_names``."""

DEEPGLOBE_LAYOUT = """expected layout under the root (PATNet's preprocessed Deepglobe, 408 x 408 tiles):
  <c>/test/origin/<tile>.jpg          for c = 1..6 (one folder per class)
  <c>/test/groundtruth/<tile>.png     black-and-white mask of class c in that tile"""

ISIC_LAYOUT = """expected layout under the root (PATNet's ISIC-2018):
  ISIC2018_Task1-2_Training_Input/<c>/<id>.jpg         for c = 1, 2, 3 (images sorted by diagnosis)
  ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png   lesion mask (0 / 255)"""

CHESTXRAY_LAYOUT = """expected layout under the root (PATNet's LungSegmentation):
  CXR_png/<id>.png                    chest X-ray
  masks/<id>_mask.png (or <id>.png)   lung mask (0 / 255); X-rays without a mask are not used"""


class _CrossDomainDataModule(EpisodeDataModule):
    """A test-only binary-mask benchmark: one fold whose novel classes are all the dataset's classes.

    The defaults are PATNet's test protocol, shared by its three sets. The others are those of PATNet's
    protocol and of :class:`~datamodules.base.EpisodeDataModule`.

    Args:
        image_size: Side of the square model input; PATNet tests at 400.
        protocol: Evaluation protocol; "patnet" is PATNet's (classes in turn).
        test_episodes: Test episodes (PATNet: 600).
        val_episodes: Validation episodes (same images, other seed).
        test_seed: Seed of the test episode list.
        pool_min_pixels: Object pixels an image needs to be drawn; 0 keeps every masked image (PATNet).
    """

    num_folds = 1
    test_only = True

    def __init__(
        self,
        image_size: int = 400,
        protocol: ProtocolName = "patnet",
        test_episodes: int = 600,
        val_episodes: int = 600,
        test_seed: int = 0,
        pool_min_pixels: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            image_size=image_size,
            protocol=protocol,
            test_episodes=test_episodes,
            val_episodes=val_episodes,
            test_seed=test_seed,
            pool_min_pixels=pool_min_pixels,
            **kwargs,
        )

    def fold_novel_classes(self, fold: int) -> list[int]:
        return list(range(1, self.num_classes + 1))

    def make_source(self, split: str) -> SegmentationSource:
        if split != "test":
            raise DatasetError(f"{self.name} is test-only: it has no {split!r} images")
        return BinaryMaskFolderSource(self.items(), f"{self.name} under {self.root}")

    def items(self) -> list[MaskedImage]:  # pragma: no cover - abstract
        raise NotImplementedError


class DeepglobeDataModule(_CrossDomainDataModule):
    """Deepglobe land cover as PATNet tests it: 6 classes of 408 x 408 satellite tiles (test-only).

    Reads PATNet's preprocessed release: ``<root>/<c>/test/origin/*.jpg`` with the class-c mask
    ``<root>/<c>/test/groundtruth/<same name>.png`` for c = 1..6 (a tile is in every class folder whose
    class it shows). Class ids 1..6 = folders 1..6. The others are those of PATNet's
    protocol and of :class:`~datamodules.base.EpisodeDataModule`.

    Args:
        root: The Deepglobe folder holding ``1/`` .. ``6/``.
    """

    name = "deepglobe"
    num_classes = 6
    class_names = DEEPGLOBE_CLASSES

    def __init__(
        self,
        root: str = "data/Deepglobe",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)

    def items(self) -> list[MaskedImage]:
        require_dir(self.root, "dataset root", DEEPGLOBE_LAYOUT)
        out = []
        for c in range(1, self.num_classes + 1):
            origin = require_dir(self.root / str(c) / "test" / "origin", "image folder", DEEPGLOBE_LAYOUT)
            truth = require_dir(self.root / str(c) / "test" / "groundtruth", "mask folder", DEEPGLOBE_LAYOUT)
            for stem, image, mask in pair_by_stem(
                files_with_suffix(origin, ".jpg"),
                files_with_suffix(truth, ".png"),
                str(truth / "{stem}.png"),
                str(origin / "{stem}.jpg"),
            ):
                out.append(MaskedImage(f"{c}/{stem}", image, mask, c))
        return out


class ISIC2018DataModule(_CrossDomainDataModule):
    """ISIC-2018 skin lesions as PATNet tests them: 3 diagnosis classes, lesion masks (test-only).

    Reads PATNet's layout: the Task 1-2 training images sorted by diagnosis into
    ``<root>/ISIC2018_Task1-2_Training_Input/{1,2,3}/<id>.jpg``, masks in
    ``<root>/ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png``. Class ids 1..3 = folders
    1..3; the diagnosis of each folder is not stated by PATNet's code (see ``class_names``). Every
    other argument is :class:`~datamodules.base.EpisodeDataModule`'s.

    Args:
        root: The ISIC folder holding both ISIC2018 folders.
        class_names: Names of folders 1, 2, 3; default nevus, melanoma, seborrheic_keratosis.
    """

    name = "isic2018"
    num_classes = 3
    class_names = ISIC_CLASSES

    def __init__(
        self,
        root: str = "data/ISIC",
        class_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if class_names is not None:
            if len(class_names) != self.num_classes:
                raise DatasetError(f"class_names needs 3 names (folders 1, 2, 3), got {class_names}")
            self.class_names = tuple(class_names)

    def items(self) -> list[MaskedImage]:
        require_dir(self.root, "dataset root", ISIC_LAYOUT)
        inputs = require_dir(self.root / "ISIC2018_Task1-2_Training_Input", "image folder", ISIC_LAYOUT)
        truth_dir = require_dir(self.root / "ISIC2018_Task1_Training_GroundTruth", "mask folder", ISIC_LAYOUT)
        truth = files_with_suffix(truth_dir, ".png", strip="_segmentation")
        out, listed = [], {}
        for c in range(1, self.num_classes + 1):
            folder = require_dir(
                inputs / str(c),
                f"class folder {c} ({self.class_names[c - 1]}; sort the images by diagnosis)",
                ISIC_LAYOUT,
            )
            for stem, image in files_with_suffix(folder, ".jpg").items():
                if stem in listed:
                    raise DatasetError(f"image {stem} is in two class folders: {listed[stem]} and {image}")
                listed[stem] = image
                if stem not in truth:
                    raise DatasetError(
                        f"image {image} has no mask: expected {truth_dir / (stem + '_segmentation.png')}"
                    )
                out.append(MaskedImage(f"{c}/{stem}", image, truth[stem], c))
        for stem, mask in truth.items():
            if stem not in listed:
                raise DatasetError(
                    f"mask {mask} has no image: expected {inputs / '<1|2|3>' / (stem + '.jpg')} "
                    "(every Task 1 training image is sorted into a class folder)"
                )
        return out


class ChestXrayDataModule(_CrossDomainDataModule):
    """Chest X-ray lung segmentation as PATNet tests it: one class, lung masks (test-only).

    Reads PATNet's layout: ``<root>/CXR_png/<id>.png`` with the mask ``<root>/masks/<id>_mask.png``
    (Montgomery masks named ``<id>.png`` are accepted too). X-rays without a mask are not used (the
    published set has 800 X-rays and 704 masks; PATNet lists the masks). The others are those of PATNet's
    protocol and of :class:`~datamodules.base.EpisodeDataModule`.

    Args:
        root: The LungSegmentation folder holding ``CXR_png/`` and ``masks/``.
        image_size: Side of the square model input; PATNet tests at 400.
        protocol: Evaluation protocol; "patnet" is PATNet's.
        test_episodes: Test episodes (PATNet: 600).
        val_episodes: Validation episodes (same images, other seed).
        test_seed: Seed of the test episode list.
        pool_min_pixels: Lung pixels an image needs to be drawn; 0 keeps every masked X-ray (PATNet).
    """

    name = "chestxray"
    num_classes = 1
    class_names = ("lung",)

    def __init__(
        self,
        root: str = "data/LungSegmentation",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)

    def items(self) -> list[MaskedImage]:
        require_dir(self.root, "dataset root", CHESTXRAY_LAYOUT)
        images_dir = require_dir(self.root / "CXR_png", "image folder", CHESTXRAY_LAYOUT)
        masks_dir = require_dir(self.root / "masks", "mask folder", CHESTXRAY_LAYOUT)
        masks = files_with_suffix(masks_dir, ".png", strip="_mask")
        pairs = pair_by_stem(
            files_with_suffix(images_dir, ".png"),
            masks,
            str(masks_dir / "{stem}_mask.png"),
            str(images_dir / "{stem}.png"),
            require_mask=False,
        )
        return [MaskedImage(stem, image, mask, 1) for stem, image, mask in pairs]
