"""The options of ``fewshot-seg segment`` for several classes and several processes, and their checks.

Kept apart from ``tools/segment.py`` (the 1-class flow) so that the single-class command stays as it was:
without any of these options it runs exactly as before.
"""

from __future__ import annotations

import argparse

from fewshot_seg.tools.common import ToolError


def add_class_options(parser: argparse.ArgumentParser) -> None:
    """``--class``, ``--supports``, ``--class-names``, ``--classes-file``, ``--format``, ``--instances``,
    ``--devices``, ``--num-nodes`` (docs/inference.md, "Several classes: fewshot-seg segment")."""
    group = parser.add_argument_group("several classes (a palette label PNG per query)")
    group.add_argument(
        "--class",
        dest="classes",
        nargs=3,
        action="append",
        metavar=("NAME", "IMAGE", "MASK"),
        help="a support of class NAME with its binary mask; repeat for more shots and more classes",
    )
    group.add_argument(
        "--supports",
        dest="supports_dir",
        metavar="DIR",
        help="DIR/<class name>/<img> with <img>_mask.png beside it, and/or DIR/<img> with a class-index "
        "<img>_mask.png and DIR/classes.txt",
    )
    group.add_argument(
        "--class-names",
        nargs="+",
        metavar="NAME",
        help="the classes in label order (value i = the i-th name); --support masks are then class-index "
        "masks",
    )
    group.add_argument(
        "--classes-file",
        metavar="FILE",
        help="classes.txt (one name a line, line i = value i), instead of --class-names",
    )
    group.add_argument(
        "--format",
        choices=("coco", "png"),
        default=None,
        help="coco (the default with classes): label PNGs, manifest and OUT/annotations.json (COCO, RLE); "
        "png: label PNGs and manifest only",
    )
    group.add_argument(
        "--instances", action="store_true", help="one COCO annotation per connected component of a class"
    )
    group.add_argument(
        "--devices",
        type=int,
        default=None,
        help="processes (GPUs) per node: Lightning's predict loop under DDP, each rank a share of the "
        "queries",
    )
    group.add_argument("--num-nodes", type=int, default=1, help="nodes, with --devices (default 1)")


def uses_classes(args: argparse.Namespace) -> bool:
    """Whether the run names classes (the class flow) rather than one unnamed object."""
    return bool(args.classes or args.supports_dir or args.class_names or args.classes_file)


def check_class_options(args: argparse.Namespace) -> None:
    """Refuse, in one line naming the options, what cannot work together.

    Raises:
        ToolError: no support given, ``--supports DIR`` with other supports, both ``--class-names`` and
            ``--classes-file``, COCO / multi-process options without classes, a count below 1.
    """
    if not (args.support or args.classes or args.supports_dir):
        raise ToolError("give the supports: --support IMAGE MASK, --class NAME IMAGE MASK or --supports DIR")
    if args.supports_dir and (args.support or args.classes or args.class_names or args.classes_file):
        raise ToolError(
            "--supports DIR holds every support and its classes: give no --support, --class or names"
        )
    if args.class_names and args.classes_file:
        raise ToolError("give the class names once: --class-names or --classes-file")
    if not uses_classes(args):
        named = [o for o, v in (("--format", args.format), ("--instances", args.instances)) if v]
        named += ["--devices"] if args.devices is not None else []
        if named:
            raise ToolError(
                f"{', '.join(named)} need(s) named classes: give the object a name, "
                "e.g. --class object IMAGE MASK instead of --support IMAGE MASK"
            )
    if args.instances and args.format == "png":
        raise ToolError("--instances splits COCO annotations: it needs --format coco")
    for option, value in (("--devices", args.devices), ("--num-nodes", args.num_nodes)):
        if value is not None and value < 1:
            raise ToolError(f"{option} must be at least 1, got {value}")


__all__ = ["add_class_options", "check_class_options", "uses_classes"]
