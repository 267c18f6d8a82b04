"""The documentation's commands run: every shell command in README.md and docs/*.md, in a cheap form.

Commands are the lines of the fenced blocks marked ```bash (a trailing backslash joins the next line;
``A && B`` is checked as A, then B). Each runs on CPU in well under a second, without data or checkpoints:

* ``fewshot-seg <sub> ...``: ``fewshot_seg.cli.main([<sub>, ..., "--print_config"])`` must exit 0 (the
  arguments are parsed and validated, no class is instantiated). A command asking for help
  (``--help``, ``--data.help <Class>``) runs as written and must exit 0. The model tools
  (``fewshot-seg segment|serve ...``, ``fewshot_seg.cli.TOOLS``) must parse their arguments.
* ``make <target> [VAR=value ...]``: ``make -n`` (dry run) with the same arguments must exit 0.
* ``python -m <module> ...`` / ``python <script>.py ...``: the module or script, run as ``__main__`` with
  ``--help`` instead of its arguments, must exit 0.
* ``srun ...``, ``torchrun ...``, ``sbatch ...``: the ``fewshot-seg ...`` / ``-m fewshot_seg.cli ...`` command
  inside is checked as above (a launcher line without one fails).
* ``wandb sweep <file>``: the sweep file exists.

Before that, in every command: ``<...>`` placeholders become a dummy path, ``$VAR`` / ``${VAR}`` become
``1``, leading ``NAME=value`` environment assignments are dropped, and ``#`` comments are removed.
Skipped lines (the only skip rules): empty lines, comment lines (``#...``, ``#!``, ``#SBATCH``), and lines
starting with ``cd``, ``export``, ``pip`` or ``source`` (shell set-up). Any other command form fails
the test with its file and line, so that new documentation stays checkable: use ```bash for shell
commands only, and ```text / ```yaml / ```python for everything else.
"""

from __future__ import annotations

import importlib
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fewshot_seg.cli import TOOLS, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_FIRST_WORDS = ("cd", "export", "pip", "source")
LAUNCHERS = ("srun", "torchrun", "sbatch")
PLACEHOLDER = "/nonexistent/fewshot-docs-placeholder"
COMMAND_WORDS = ("fewshot-seg", "make", "python", "python3", "torchrun", "srun", "sbatch", "wandb")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def _blocks(path: Path) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first content line, lines) of every fenced block of ``path``."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i + 2
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start, body))
        i += 1
    return blocks


def _commands() -> list[tuple[str, int, str]]:
    """(file relative to the root, line, command) of every command line of every ```bash block."""
    out = []
    for path in DOCS:
        rel = path.relative_to(ROOT).as_posix()
        for lang, start, body in _blocks(path):
            if lang != "bash":
                continue
            j = 0
            while j < len(body):
                line_no, text = start + j, body[j]
                while text.rstrip().endswith("\\") and j + 1 < len(body):
                    j += 1
                    text = text.rstrip()[:-1] + " " + body[j]
                j += 1
                if not _skipped(text.strip()):
                    out.append((rel, line_no, text.strip()))
    return out


def _skipped(line: str) -> bool:
    """The skip rules: empty, a comment (``#``, ``#!``, ``#SBATCH``), shell set-up (cd/export/pip/source)."""
    return not line or line.startswith("#") or line.split()[0] in SKIP_FIRST_WORDS


COMMANDS = _commands()


def _tokens(command: str) -> list[str]:
    command = re.sub(r"<[^<>\n]+>", PLACEHOLDER, command)
    command = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "1", command)
    tokens = shlex.split(command, comments=True)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens.pop(0)  # environment assignment before the program
    return tokens


def _is_help(args: list[str]) -> bool:
    return any(a in ("-h", "--help") or re.fullmatch(r"--[\w.]*help(=.*)?", a) for a in args)


def _check_cli(args: list[str], where: str, capsys: pytest.CaptureFixture) -> None:
    if args and args[0] in TOOLS:
        tool = importlib.import_module(TOOLS[args[0]])
        if _is_help(args):
            with pytest.raises(SystemExit) as exit_info:
                tool.parse_args(args[1:])
            assert exit_info.value.code in (0, None), f"{where}: fewshot-seg {shlex.join(args)}"
        else:
            tool.parse_args(args[1:])  # argparse exits 2 on arguments it does not take
        return
    run = args if _is_help(args) else [*args, "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(run)
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{where}: fewshot-seg {shlex.join(run)}\n{out.err[-2000:]}"


def _check_python(tokens: list[str], where: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if len(tokens) >= 3 and tokens[1] == "-m":
        target, run = tokens[2], lambda: runpy.run_module(tokens[2], run_name="__main__", alter_sys=True)
    elif len(tokens) >= 2 and tokens[1].endswith(".py"):
        target, run = tokens[1], lambda: runpy.run_path(str(ROOT / tokens[1]), run_name="__main__")
    else:
        pytest.fail(f"{where}: only `python -m <module> ...` and `python <script>.py ...` are checkable")
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: module already imported
        with pytest.raises(SystemExit) as exit_info:
            run()
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{where}: python {target} --help failed\n{out.err[-2000:]}"


def _inner_cli(tokens: list[str]) -> list[str] | None:
    """The fewshot-seg arguments inside a launcher command line, or None."""
    if "fewshot-seg" in tokens:
        return tokens[tokens.index("fewshot-seg") + 1 :]
    for k in range(len(tokens) - 1):
        if tokens[k] == "-m" and tokens[k + 1] == "fewshot_seg.cli":
            return tokens[k + 2 :]
    return None


def _check(part: str, where: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    if _skipped(part):
        return
    tokens = _tokens(part)
    if not tokens:
        return
    program = tokens[0]
    if program == "fewshot-seg":
        _check_cli(tokens[1:], where, capsys)
    elif program == "make":
        done = subprocess.run(["make", "-n", *tokens[1:]], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{where}: make -n {shlex.join(tokens[1:])}\n{done.stderr}"
    elif program in ("python", "python3"):
        _check_python(tokens, where, monkeypatch, capsys)
    elif program in LAUNCHERS:
        inner = _inner_cli(tokens)
        if inner is None:
            pytest.fail(f"{where}: a {program} line must run `fewshot-seg ...` or `-m fewshot_seg.cli ...`")
        _check_cli(inner, where, capsys)
    elif program == "wandb" and len(tokens) == 3 and tokens[1] == "sweep":
        assert (ROOT / tokens[2]).is_file(), f"{where}: sweep file {tokens[2]} does not exist"
    else:
        pytest.fail(
            f"{where}: `{part[:80]}` is no command form tests/test_docs.py can check (see its docstring); "
            "use ```text for output or add a rule there"
        )


@pytest.mark.parametrize(("doc", "line", "command"), COMMANDS, ids=[f"{d}:{n}" for d, n, _ in COMMANDS])
def test_command_runs(
    doc: str, line: int, command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    for part in re.split(r"\s*&&\s*", command):
        _check(part.strip(), f"{doc}:{line}", monkeypatch, capsys)


def test_commands_were_found() -> None:
    assert len(COMMANDS) > 20, "the extraction of ```bash blocks found almost nothing"
    assert {d for d, _, _ in COMMANDS} >= {"README.md", "docs/training.md", "docs/distributed.md"}


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_blocks_are_labelled(path: Path) -> None:
    """Every block names its language, and shell commands are only in ```bash blocks (so they are checked)."""
    for lang, start, body in _blocks(path):
        assert lang, f"{path.name}:{start - 1}: fenced block without a language (bash, text, yaml, python)"
        if lang == "bash":
            continue
        for k, text in enumerate(body):
            first = text.split(maxsplit=1)[0] if text.strip() else ""
            assert first not in COMMAND_WORDS or lang in ("yaml", "python"), (
                f"{path.name}:{start + k}: a shell command in a ```{lang} block; use ```bash"
            )


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    in_code = {n for _, start, body in _blocks(path) for n in range(start, start + len(body))}
    heads = [
        line.lstrip("#")
        for n, line in enumerate(text.splitlines(), 1)
        if line.startswith("#") and n not in in_code
    ]
    return {_slug(h) for h in heads} | set(re.findall(r'<a id="([^"]+)"', text))


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_links_resolve(path: Path) -> None:
    """Relative links name files of the repository (and headings or anchors that exist)."""
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: link to {target}: no such heading in {dest.name}"


def test_no_links_outside_the_repository() -> None:
    for path in DOCS:
        assert "../shared" not in path.read_text(), f"{path.name} refers to a file outside the repository"


def test_readme_lists_the_make_variables() -> None:
    """README's list of `make` variables is the one `make help` prints."""
    printed = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = printed.split("Variables", 1)[1]
    make_vars = set(re.findall(r"\b([A-Z][A-Z_]+)=", listed))
    readme = (ROOT / "README.md").read_text()
    sentence = readme[readme.index("`make help` lists every target") :].split("\n\n", 1)[0]
    readme_vars = set(re.findall(r"`([A-Z][A-Z_]+)(?:=[^`]*)?`", sentence))
    assert readme_vars == make_vars, f"README lists {sorted(readme_vars)}, make help {sorted(make_vars)}"
