"""What the commands share to report results: tables (CSV), figures (matplotlib, headless), progress bars, the
text files they read, the memory they watch, and the round-robin that times contenders in turn.

Every command's output goes through here, so a figure or a progress bar looks and behaves the same everywhere.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from .errors import InputError


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or one clear error (missing, a folder, not UTF-8, binary)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--text {path}: no such file; give a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--text {path} is not UTF-8 ({e}); convert it first (iconv -t utf-8).") from None
    if "\x00" in text:
        raise InputError(f"--text {path} holds NUL bytes: it looks like a binary file, not text.")
    return text


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per dict, the first dict's keys as the header."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (figures are written to files, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_axis(axis) -> None:
    """Ticks of a log-scale axis as plain numbers at 1..9 x 10^n (20, 30, 40 rather than 2x10^1, or no label at all
    when the data spans less than a decade)."""
    from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, ScalarFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 4, 5, 6, 7, 8, 9)))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def progress(total: int, desc: str, unit: str = "step", disable: bool = False, **kwargs):
    """A tqdm bar on stderr. Off a terminal (a log file, CI) it redraws at most every 30 s instead of flooding."""
    from tqdm import tqdm

    quiet = not sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.05,
                disable=disable, mininterval=30 if quiet else 0.1, **kwargs)


def peak_rss_mib() -> float:
    """The process's resident-memory high-water mark (getrusage; Linux reports KiB). It includes loading the weights,
    so it shows growth only once a run needs more than that: see current_rss_mib too."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float | None:
    """Resident memory now (Linux /proc/self/statm), None where that file does not exist."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def round_robin(runs: dict, rounds: int, each=lambda: None) -> dict[str, list]:
    """What each run returns in every round, the runs called in turn (round-robin) after one warm-up each: a machine
    whose speed drifts (other tenants, clock changes) slows every contender alike instead of whichever ran last.
    each() is called after every call, warm-ups included (a progress bar's update)."""
    out = {name: [] for name in runs}
    for r in range(rounds + 1):  # round 0 warms up (page cache, a compiled step's first calls): not kept
        for name, fn in runs.items():
            result = fn()
            if r:
                out[name].append(result)
            each()
    return out
