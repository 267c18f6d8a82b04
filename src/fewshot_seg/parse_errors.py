"""Command-line and config-file mistakes as one line that leads with the cause (and a "did you mean").

jsonargparse reports an unknown option of a model or DataModule class, or a misspelt class, inside a
union-type report of a dozen lines ending in "Expected a <class 'NoneType'>", after the usage text.
:func:`explain` turns such a message into one line; :func:`check_config_files` names a config file that
is not valid YAML (jsonargparse's message names ``<unicode string>``); :func:`build_error` names the option
behind an error raised while the model is built (an unknown backbone).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """An option, class or config file the command line cannot use (named, with what was meant)."""


# Lines of jsonargparse's union-type report that never say what is wrong.
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Expected a <class 'NoneType'>",
    "Given value type:",
    "Given value:",
    "Expected a path but",
)


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def class_options(class_path: str) -> list[str]:
    """The dotted option names (``pos.num_queries``, ``fold``, ...) of a class's ``__init__``."""
    from jsonargparse import ArgumentParser

    cls = _import(class_path)
    if cls is None:
        return []
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls)
        return list(parser.get_defaults().keys())
    except Exception:  # a class jsonargparse cannot describe: no suggestion
        return []


def _import(class_path: str) -> type | None:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def known_classes(group: str) -> list[str]:
    """Short and full names of the classes ``--model`` (LightningModules) / ``--data`` (DataModules) take."""
    from pytorch_lightning import LightningDataModule, LightningModule

    import datamodules
    import fewshot_seg.lightning as modules

    base, module = (LightningModule, modules) if group == "model" else (LightningDataModule, datamodules)
    names = []
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base:
            names += [name, f"{module.__name__}.{name}", f"{obj.__module__}.{name}"]
    return names


def _value_error(key: str, expected: Sequence[str], value: str) -> str:
    """``--key: 'v' is not one of a, b (did you mean a?)`` or ``--key: expected float, got 'v'``."""
    choices: list[str] = []
    for kind in expected:
        if kind.startswith("typing.Literal["):
            choices += [c.strip().strip("'") for c in kind[len("typing.Literal[") : -1].split(",")]
    choices = list(dict.fromkeys(choices))  # a union of literals may repeat values
    if choices:
        return f"{key}: {value!r} is not one of {', '.join(choices)}{_did_you_mean(value, choices)}"
    kinds = " or ".join(re.sub(r"<class '([^']+)'>", r"\1", k) for k in expected)
    return f"{key}: expected {kinds}, got {value!r}"


def explain(message: str, options: Sequence[str]) -> str:
    """One line for a jsonargparse parse error ``message``; ``options``: the subcommand's option strings."""
    key = re.match(r'Parser key "([^"]+)"', message)
    group = key.group(1) if key else None
    problem = re.search(r"Problem with given class_path '([^']+)':\s*\n\s*(.+)", message)
    if problem and group:
        class_path, cause = problem.group(1), problem.group(2).strip()
        unknown = None
        found = re.match(r"unrecognized arguments: --?([^=\s]+)", cause) or re.match(
            r"Option '([^']+)' is not accepted", cause
        )
        if found:
            unknown = found.group(1)
        elif found := re.match(r"Group '([^']+)' does not accept option '([^']+)'", cause):
            unknown = f"{found.group(1)}.{found.group(2)}"
        if unknown is not None:
            prefix = f"--{group}.init_args."
            hint = _did_you_mean(unknown, class_options(class_path))
            hint = hint.replace(" (did you mean ", f" (did you mean {prefix}") if hint else ""
            return f"{prefix}{unknown}: no such option of {class_path}{hint}"
        if re.match(r"(module '[^']+' has no attribute|No module named)", cause):
            return f"--{group}: no class {class_path!r}{_did_you_mean(class_path, known_classes(group))}"
        body = message[problem.start(2) :]
        if found := re.match(r'Parser key "([^"]+)":\s*Expected a (.+?)\. Got value: (.*)', body):
            key = f"--{group}.init_args.{found.group(1)}"
            return _value_error(key, [found.group(2)], found.group(3).strip())
    if group and (found := re.search(r"Expected a dot import path string: (\S+)", message)):
        name = found.group(1)
        return f"--{group}: no class {name!r}{_did_you_mean(name, known_classes(group))}"
    if found := re.match(r"unrecognized arguments: (.+)", message.strip()):
        tokens = [t for t in found.group(1).split() if t.startswith("-")] or found.group(1).split()[:1]
        parts = []
        for token in tokens:
            name = token.split("=", 1)[0]
            parts.append(f"{name}: no such option{_did_you_mean(name, options)}")
        return "; ".join(parts)
    value = re.search(r"(?:Got value|Given value): (.*)", message)
    if group and value and not problem:
        expected = re.findall(r"Expected a (.+?)(?:\. Got value:.*)?$", message, flags=re.MULTILINE)
        expected = [t for t in expected if "NoneType" not in t]
        if expected:
            return _value_error(f"--{group}", expected, value.group(1).strip())
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    kept = [line.lstrip("- ") for line in lines if not line.lstrip("- ").startswith(_NOISE)]
    return " ".join(kept) or message.strip()


def build_error(err: BaseException) -> ConfigError | None:
    """An error raised while the command line's model is built, as one line naming the option at fault.

    jsonargparse reports it inside its union-type report (``Does not validate against any of the Union
    subtypes``, the whole model namespace included); the error itself is the report's cause.
    """
    from fewshot_seg.models.backbone import BackboneError

    if isinstance(err, BackboneError):
        return ConfigError(f"--model.init_args.backbone.{err.option}: {err}")
    return None


def config_files(argv: Sequence[str]) -> list[str]:
    """The files of ``-c FILE`` / ``--config FILE`` / ``--config=FILE`` in a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_config_files(argv: Sequence[str]) -> None:
    """Refuse a ``-c`` file that is not valid YAML, naming the file, line and column.

    Raises:
        ConfigError: ``config <file>: not valid YAML at line L, column C: <problem>`` (with a word on tabs).
    """
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        text = path.read_text(errors="replace")
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            line = (
                text.splitlines()[mark.line]
                if mark is not None and mark.line < len(text.splitlines())
                else ""
            )
            tab = "\t" in line[: mark.column + 1] if mark is not None else False
            hint = " (a tab: YAML indents with spaces only)" if tab else ""
            raise ConfigError(f"config {path}: not valid YAML{where}: {problem}{hint}") from None
