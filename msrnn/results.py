"""Results files of the grid commands (`eval ppl`, `eval needle`, `eval recall`): results.jsonl holds a settings line,
then one finished unit per line, appended (and flushed) as each finishes, so an interrupted run keeps them; `--resume`
reads them back, refusing a file of other settings and any line msrnn did not write (the unit checks)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from .errors import InputError
from .grid import budget_key

RESULTS = "results.jsonl"


def record(path: Path, record: dict) -> None:
    """Append one finished unit to the results file (flushed: an interrupted run keeps it)."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def load_results(path: Path, settings: dict, resume: bool,
                 key: Callable[[dict], tuple] = lambda u: (u["policy"], budget_key(u["states"]), u["batch"]),
                 problem: Callable[[dict], str | None] | None = None) -> dict[tuple, dict]:
    """Finished units {key(unit): unit} ({(policy, states, batch): sums} for eval ppl) from a previous run with the
    same settings (--resume), else a fresh file holding the settings."""
    if resume and path.is_file():
        lines = [_parse(line) for line in path.read_text().splitlines()]
        lines = [line for line in lines if line is not None]  # a line cut short by a kill is not a finished unit
        old = lines[0].get("settings") if lines and isinstance(lines[0], dict) else None
        if not isinstance(old, dict):
            raise InputError(f"--resume: {path} does not start with the settings line msrnn writes; it is not a "
                             "results file of `msrnn eval ppl`. Drop --resume (or choose another --out) to start again.")
        diff = [f"{k} {settings[k]!r} (was {old.get(k)!r})" for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"--resume: {path} was made with other settings: {'; '.join(diff)}. Rerun with the "
                             "same settings, or drop --resume (or choose another --out) to start again.")
        for i, unit in enumerate(lines[1:], start=2):
            if wrong := (problem or unit_problem)(unit):
                raise InputError(f"--resume: unit {i} of {path} is not one msrnn wrote ({wrong}); delete that line "
                                 "(its cell is then computed again) or drop --resume to start afresh.")
        return {key(u): u for u in lines[1:]}
    if path.is_file():
        print(f"msrnn: starting afresh: replacing {path} (use --resume to continue it)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": settings}) + "\n")
    return {}


def unit_problem(u) -> str | None:
    """What is wrong with one unit read back from a results file, if anything: the keys `sums()` writes, with
    counts that are non-negative integers, sums that are finite numbers, and per-chunk lists that add up."""
    def is_int(x, lo=0):
        return isinstance(x, int) and not isinstance(x, bool) and x >= lo

    def is_number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not isinstance(u, dict):
        return f"a JSON {type(u).__name__}, not an object"
    states = u.get("states", 0)
    per_layer = isinstance(states, list) and states and all(is_int(k, 1) for k in states)
    if not isinstance(u.get("policy"), str) or not (states is None or is_int(states, 1) or per_layer) \
            or not is_int(u.get("batch")):
        return "policy, states or batch missing or of the wrong type"
    if not is_int(u.get("tokens"), 1) or not is_int(u.get("agree")) or u["agree"] > u["tokens"] \
            or not all(is_number(u.get(k)) for k in ("loss", "kl")):
        return "tokens, agree, loss or kl missing, negative or not finite"
    chunks = [u.get(k) for k in ("chunk_tokens", "chunk_loss", "chunk_agree", "chunk_kl")]
    if any(c is not None for c in chunks) and (
            not all(isinstance(c, list) and len(c) == len(chunks[0]) and all(map(is_number, c)) for c in chunks)
            or sum(chunks[0]) != u["tokens"]):
        return "its per-chunk lists are missing, of different lengths, or do not add up to its tokens"
    return None


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def answer_unit_key(unit: dict) -> tuple:
    """An answer unit's key (eval needle, eval recall): (policy, states, trial key)."""
    return unit["policy"], unit["states"], unit["trial"]


def answer_unit_problem(u) -> str | None:
    """What is wrong with one answer unit read back under --resume, if anything (an edited results.jsonl)."""
    if not isinstance(u, dict):
        return f"a JSON {type(u).__name__}, not an object"
    if not isinstance(u.get("policy"), str) or not (u.get("states") is None or isinstance(u.get("states"), int)) \
            or not isinstance(u.get("trial"), (str, int)):
        return "policy, states or trial missing or of the wrong type"
    lists = [u.get(k) for k in ("answers", "expected", "correct")]
    if not all(isinstance(x, list) and len(x) == len(lists[0]) for x in lists) \
            or not all(isinstance(c, bool) for c in lists[2]):
        return "answers, expected and correct must be lists of one length (correct: true/false)"
    return None
