"""`msrnn bench` runs end to end on a tiny checkpoint (no timing is asserted: machines differ)."""
import json
import os
import re

import pytest
import torch

import msrnn
from msrnn import bench
from msrnn.cli import main
from tiny import hf_model, save


def test_bench_cli_writes_tables_json_and_png(tmp_path, capsys):
    directory = save(hf_model(max_position_embeddings=512), tmp_path / "ckpt")
    out = tmp_path / "bench"
    main(["bench", "--model", directory, "--dtype", "bf16", "--positions", "4,16", "--bounded-positions", "40,80",
          "--states", "8", "--steps", "2", "--prefill-tokens", "8", "--budget-context", "32", "--budget-states",
          "8,16,32", "--stream-tokens", "600", "--stream-states", "16", "--out", str(out)])
    res = json.loads((out / "bench.json").read_text())
    assert set(res["msrnn_full_ms"]) == {"4", "16"} and set(res["hf_full_ms"]) == {"4", "16"}
    assert [(r["states"], r["batch"]) for r in res["throughput"]] == [(8, 4), (16, 2), (32, 1)]
    assert res["throughput"][-1]["ratio_to_full"] == 1.0
    assert res["states"] == [8] and {k: set(v) for k, v in res["msrnn_bounded_ms"].items()} == {"8": {"40", "80"}}
    assert set(res["hf_full_at_ms"]) == {"40", "80"} and res["floor_ms_range"][0] <= res["floor_ms"]
    assert res["stream"]["tokens"] == 600 and res["stream"]["rss_mb_end"] > 0
    agree = res["fp32_agreement"]  # bf16 against the same checkpoint in fp32: close, but not equal
    assert 0 < agree["max_abs_logit_diff"] < 1 and agree["top1_agreement"] > 0.8
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "× transformers" in (out / "bench.md").read_text() and "floor" in capsys.readouterr().out
    assert "prefill of a prompt of 8 tokens: msrnn " in (out / "bench.md").read_text()  # the prompt's length said


def test_bench_takes_several_budgets_as_eval_does(tmp_path, capsys):
    """--states as every command takes it: a list, budgets per layer in brackets; one row and one line per budget,
    each budget's states bounded by its own policy."""
    directory = save(hf_model(max_position_embeddings=512), tmp_path / "ckpt")
    out = tmp_path / "bench"
    main(["bench", "--model", directory, "--dtype", "fp32", "--compare", "none", "--positions", "4",
          "--bounded-positions", "20,40", "--states", "12,[10,6],6", "--steps", "1", "--prefill-tokens", "4",
          "--budget-context", "16", "--budget-states", "8,16", "--stream-tokens", "0", "--out", str(out)])
    res = json.loads((out / "bench.json").read_text())
    assert res["states"] == [6, [10, 6], 12]  # smallest mean first, as eval's grid orders them
    assert {k: set(v) for k, v in res["msrnn_bounded_ms"].items()} == {k: {"20", "40"} for k in ("6", "[10,6]", "12")}
    table = (out / "bench.md").read_text()
    assert all(f"| msrnn tova {k} | {q} |" in table for k in ("6", "[10,6]", "12") for q in (20, 40))
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    model = msrnn.load_model(directory)  # what the bench times: a state held to each budget, per layer
    for k, sizes in [(6, [6, 6]), ([10, 6], [10, 6])]:
        policy = msrnn.make_policy("tova", k)
        state = bench.advance(model, model.init_state(1, policy), policy, 40)
        assert [layer.size for layer in state.layers] == sizes


@pytest.mark.parametrize("states, message", [
    ("0", r"--states '0': give positive budgets"),
    ("12,abc", r"--states '12,abc': give comma-separated integers"),
    ("[8,-1]", r"--states '\[8,-1\]': give positive budgets"),
    ("[8,8,8]", r"3 per-layer budgets for a model of 2 layers"),  # checked against the model's depth once it is loaded
])
def test_bench_states_errors(tmp_path, capsys, states, message):
    directory = save(hf_model(max_position_embeddings=512), tmp_path / "ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", directory, "--compare", "none", "--states", states, "--stream-tokens", "0",
              "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("msrnn: error: ") and re.search(message, err), err
    assert not (tmp_path / "bench").exists()  # refused before anything ran


def test_hf_decode_restores_its_cache_between_repeats(tmp_path):
    """Every timed repeat must decode from the same position, or later repeats time a longer cache."""
    directory = save(hf_model(), tmp_path / "ckpt")
    runner = bench.HFRunner(msrnn.weights.resolve(directory), torch.float32)
    lengths = []
    original = runner.model.forward

    def spy(*args, cache=None, **kwargs):
        lengths.append(cache.get_seq_length())
        return original(*args, cache=cache, **kwargs)

    runner.model.forward = spy
    runner.decode_ms(position=10, steps=3)
    assert lengths[-12:] == [10, 11, 12] * 4  # one warm-up and three timed repeats, each from position 10


def test_bench_refuses_budget_states_that_never_reach_the_full_cache(tmp_path, capsys):
    """Throughput is relative to the full cache of --budget-context tokens: one --budget-states value must reach it,
    which is checked before anything loads (it ended in a raw StopIteration after the timings)."""
    directory = save(hf_model(max_position_embeddings=512), tmp_path / "ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", directory, "--compare", "none", "--positions", "4", "--bounded-positions", "20",
              "--states", "8", "--steps", "1", "--prefill-tokens", "4", "--budget-context", "64",
              "--budget-states", "8,16", "--stream-tokens", "0", "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("msrnn: error: --budget-states 8,16") and "64" in err, err
    assert "StopIteration" not in err and not (tmp_path / "bench").exists()
    with pytest.raises(msrnn.InputError, match="--budget-states"):  # the API says the same
        bench.Bench(msrnn.load_model(directory), None, budget_context=64, budget_states=(8, 16))


FAKE_LLAMA_BENCH = """#!{python}
# a stand-in for llama.cpp's llama-bench: logs its arguments, prints what `-o json` prints (pp: 1 ms a token,
# tg: 5 ms a token) after a line of its log, as the real one may
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
p, n = int(args[args.index("-p") + 1]), int(args[args.index("-n") + 1])
print("main: llama backend init")
print(json.dumps([{{"build_commit": "fake", "n_prompt": p, "n_gen": 0, "avg_ns": p * 1e6, "avg_ts": 1000.0}},
                  {{"build_commit": "fake", "n_prompt": 0, "n_gen": n, "avg_ns": n * 5e6, "avg_ts": 200.0}}]))
"""


def fake_llama_bench(tmp_path, body=FAKE_LLAMA_BENCH):
    import sys

    exe, log = tmp_path / "llama-bench", tmp_path / "llama-bench.log"
    exe.write_text(body.format(python=sys.executable, log=str(log)))
    exe.chmod(0o755)
    return exe, log


LLAMA_ARGS = ["--dtype", "fp32", "--positions", "4", "--bounded-positions", "20", "--states", "8", "--steps", "1",
              "--prefill-tokens", "8", "--budget-context", "16", "--budget-states", "8,16", "--stream-tokens", "0"]


def test_bench_runs_llama_bench_on_the_same_gguf_in_turn_and_reports_the_ratio(tmp_path, capsys):
    """--compare llama.cpp: llama-bench (a fake here, printing the real one's JSON) runs on the model's own GGUF with
    the same threads, once per round plus a warm-up, and the report gives msrnn / llama.cpp from those numbers."""
    from test_gguf import write_gguf

    gguf = write_gguf(tmp_path / "tiny.gguf")
    exe, log = fake_llama_bench(tmp_path)
    out = tmp_path / "bench"
    main(["bench", "--model", str(gguf), "--compare", "llama.cpp", "--llama-bench", str(exe), "--threads", "1",
          *LLAMA_ARGS, "--out", str(out)])
    r = json.loads((out / "bench.json").read_text())["llama_cpp"]
    assert r["llama_cpp"] == {"tg_ms": 5.0, "pp_tps": 1000.0} and r["build"] == "fake" and r["threads"] == 1
    assert r["tg_ratio"] == pytest.approx(r["msrnn"]["tg_ms"] / 5.0) and r["msrnn"]["tg_ms"] > 0
    assert r["pp_ratio"] == pytest.approx(r["msrnn"]["pp_tps"] / 1000.0)
    calls = log.read_text().splitlines()
    assert len(calls) == r["rounds"] + 1  # a warm-up, then one run per round
    assert all(f"-m {gguf} -t 1 -p 8 -n 64 -r 1 -o json" == c for c in calls)
    table = (out / "bench.md").read_text()
    assert "| decode tg64, ms/token |" in table and f"{r['tg_ratio']:.2f}x time" in table
    assert "llama.cpp side by side" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("missing", r"needs llama.cpp's llama-bench, and none is on PATH; build it .*pip download"),
    ("not executable", r"--llama-bench .*: no executable llama-bench there; build it"),
    ("not a gguf", r"times the same GGUF file in both programs, and .* is not one; pass --model FILE.gguf"),
    ("other output", r"llama-bench's output is not the JSON msrnn reads"),
])
def test_bench_llama_cpp_errors_say_how_to_fix_them(tmp_path, capsys, monkeypatch, case, message):
    from test_gguf import write_gguf

    model = str(write_gguf(tmp_path / "tiny.gguf"))
    exe, _ = fake_llama_bench(tmp_path, FAKE_LLAMA_BENCH if case != "other output" else "#!/bin/sh\necho hello\n")
    extra = ["--llama-bench", str(exe)]
    if case == "missing":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
        extra = []
    elif case == "not executable":
        exe.chmod(0o644)
    elif case == "not a gguf":
        model = save(hf_model(max_position_embeddings=512), tmp_path / "ckpt")
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--model", model, "--compare", "llama.cpp", *extra, *LLAMA_ARGS, "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and re.search(message, err), err


def test_the_compile_cache_lives_where_the_docs_say(tmp_path, monkeypatch):
    """--compile's on-disk cache: $MSRNN_CACHE/compile, else $XDG_CACHE_HOME/msrnn/compile, else
    ~/.cache/msrnn/compile; a TORCHINDUCTOR_CACHE_DIR of the user's own wins, torch's own default does not."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from msrnn.compile_cache import cache_dir, use_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MSRNN_CACHE", str(tmp_path / "mine"))
    assert use_cache() == tmp_path / "mine" / "compile" and (tmp_path / "mine" / "compile").is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine" / "compile")  # where inductor writes
    monkeypatch.delenv("MSRNN_CACHE")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch sets once it has looked
    assert cache_dir() == tmp_path / "home" / ".cache" / "msrnn" / "compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "msrnn" / "compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "theirs"))
    assert cache_dir() == tmp_path / "theirs"
