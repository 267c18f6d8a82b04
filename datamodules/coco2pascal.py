"""COCO-20i -> Pascal-5i transfer: a COCO-20i fold-i model tested on the Pascal classes novel to it.

The test set is the Pascal VOC val images (the Pascal-5i layout); fold i's classes are the Pascal
classes whose COCO counterpart is a novel class of COCO-20i fold i under the interleaved split
(RePRI ``src/dataset/classes.py`` ``filter_classes``; MM-Former's "c2pv" evaluation counts 6/4/6/4
classes). See docs/benchmarks.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from .pascal import Pascal5iDataModule


class VocCoco(NamedTuple):
    """A Pascal VOC class and its COCO counterpart."""

    voc_id: int
    """Standard VOC id (SegmentationClassAug label value)."""
    voc_name: str
    coco_name: str
    """COCO category name (as in the COCO instance JSON)."""
    coco_index: int
    """1..80 class index of COCO-20i (rank of the COCO category id)."""


VOC_TO_COCO = (
    VocCoco(1, "aeroplane", "airplane", 5),
    VocCoco(2, "bicycle", "bicycle", 2),
    VocCoco(3, "bird", "bird", 15),
    VocCoco(4, "boat", "boat", 9),
    VocCoco(5, "bottle", "bottle", 40),
    VocCoco(6, "bus", "bus", 6),
    VocCoco(7, "car", "car", 3),
    VocCoco(8, "cat", "cat", 16),
    VocCoco(9, "chair", "chair", 57),
    VocCoco(10, "cow", "cow", 20),
    VocCoco(11, "diningtable", "dining table", 61),
    VocCoco(12, "dog", "dog", 17),
    VocCoco(13, "horse", "horse", 18),
    VocCoco(14, "motorbike", "motorcycle", 4),
    VocCoco(15, "person", "person", 1),
    VocCoco(16, "pottedplant", "potted plant", 59),
    VocCoco(17, "sheep", "sheep", 19),
    VocCoco(18, "sofa", "couch", 58),
    VocCoco(19, "train", "train", 7),
    VocCoco(20, "tvmonitor", "tv", 63),
)
"""The 20 Pascal VOC classes with their COCO counterparts (every VOC class has one)."""


def coco_fold_of(coco_index: int) -> int:
    """The COCO-20i fold (interleaved split: fold i = i+1, i+5, ..., i+77) where a COCO class is novel."""
    return (coco_index - 1) % 4


class Coco2PascalDataModule(Pascal5iDataModule):
    """Pascal VOC val episodes of the classes a COCO-20i fold-``fold`` model has not trained on (test-only).

    Fold i's novel classes (standard VOC ids) are the Pascal classes whose COCO counterpart is novel in
    COCO-20i fold i (interleaved split): fold 0 aeroplane, boat, chair, diningtable, dog, person; fold 1
    bicycle, bus, horse, sofa; fold 2 bird, car, pottedplant, sheep, train, tvmonitor; fold 3 bottle,
    cat, cow, motorbike (:data:`VOC_TO_COCO`). Class names are the COCO spellings, so the provenance
    check finds by name any class the tested COCO model was trained on. Test with the COCO model's
    checkpoint and ``--model.init_args.allow_class_overlap=true`` (another dataset). Sampling,
    resizing and every other argument are Pascal-5i's (:class:`~datamodules.base.EpisodeDataModule`).

    Args:
        root: VOC2012 folder holding ``JPEGImages/``, ``SegmentationClassAug/`` and
            ``ImageSets/Segmentation/val.txt`` (only the val images are used).
    """

    name = "coco2pascal"
    test_only = True
    class_names = tuple(v.coco_name for v in VOC_TO_COCO)

    def __init__(self, root: str = "data/VOCdevkit/VOC2012", **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)

    def fold_novel_classes(self, fold: int) -> list[int]:
        return [v.voc_id for v in VOC_TO_COCO if coco_fold_of(v.coco_index) == fold]
