"""`msrnn bench` runs end to end on a tiny checkpoint (no timing is asserted: machines differ)."""
import json
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
