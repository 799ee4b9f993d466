"""`msrnn bench` runs end to end on a tiny checkpoint (no timing is asserted: machines differ)."""
import json

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
    assert set(res["hf_full_at_ms"]) == {"40", "80"} and res["floor_ms_range"][0] <= res["floor_ms"]
    assert res["stream"]["tokens"] == 600 and res["stream"]["rss_mb_end"] > 0
    agree = res["fp32_agreement"]  # bf16 against the same checkpoint in fp32: close, but not equal
    assert 0 < agree["max_abs_logit_diff"] < 1 and agree["top1_agreement"] > 0.8
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "× transformers" in (out / "bench.md").read_text() and "floor" in capsys.readouterr().out


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
