"""Shared helpers of the data benchmarks: timing, memory from /proc, child processes, tables.

Memory is read from ``/proc`` directly (Linux only): ``/proc/<pid>/status`` for the resident set
(VmRSS) and its peak (VmHWM), ``/proc/<pid>/smaps_rollup`` for Rss / Pss / USS (private pages).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

MB = 1024.0  # /proc reports kB


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of ``/proc/<pid>/status`` (VmRSS, VmHWM, ...) as ints in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set size in MiB."""
    return proc_status(pid)["VmRSS"] / MB


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set size (high-water mark, VmHWM) of the process so far, in MiB."""
    return proc_status(pid)["VmHWM"] / MB


def smaps_rollup(pid: int | str = "self") -> dict[str, float]:
    """Rss, Pss, USS (Private_Clean + Private_Dirty) and Private_Dirty of a process in MiB (smaps_rollup).

    Private_Dirty is what the process wrote for itself (heap, copied-on-write pages); Private_Clean also
    counts file pages only this process has mapped (e.g. a memory-mapped index), which the kernel can drop.
    """
    kb = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[-1] == "kB":
            kb[key] = int(parts[0])
    return {
        "rss": kb["Rss"] / MB,
        "pss": kb["Pss"] / MB,
        "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) / MB,
        "dirty": kb["Private_Dirty"] / MB,
    }


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process (all its threads) so far, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def child_pids(pid: int | str = "self") -> list[int]:
    """Direct children of a process: ``/proc/<pid>/task/*/children``, else a scan of /proc for its ppid."""
    pid = os.getpid() if pid == "self" else int(pid)
    kids: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids.update(int(x) for x in (task / "children").read_text().split())
        return sorted(kids)
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command name (2nd field) may hold spaces; ppid is the 2nd field after the last ")"
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return sorted(kids)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock, perf_counter)."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


@contextmanager
def quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def host_line() -> str:
    """Date, cores, load average and available memory: the conditions of a run on a shared machine."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    avail = proc_meminfo().get("MemAvailable", 0) / MB / 1024
    return (
        f"{datetime.now().astimezone().isoformat(timespec='seconds')}, {os.cpu_count()} cores, "
        f"load average {' '.join(load)}, {avail:.1f} GiB available, Python {sys.version.split()[0]}"
    )


def proc_meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def standin_scale(root: str | os.PathLike) -> str:
    """The scale recorded by ``make_standin.py`` in ``<root>/standin_manifest.json``, or "?"."""
    try:
        return str(json.loads((Path(root) / "standin_manifest.json").read_text())["scale"])
    except (OSError, ValueError, KeyError):
        return "? (no stand-in manifest)"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool]) -> str:
    """A markdown table; ``right[i]`` right-aligns column i (numbers)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        return (
            "| "
            + " | ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def run_json_child(args: Sequence[str], timeout: float | None = None) -> dict:
    """Run ``python <args>`` in a fresh process (same interpreter and environment) and return the
    JSON object it prints as its last stdout line; its stderr (progress bars) goes to ours."""
    proc = subprocess.run(
        [sys.executable, *args], stdout=subprocess.PIPE, text=True, timeout=timeout, check=False
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])
