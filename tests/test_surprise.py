"""The surprise policy (msrnn/policies/surprise.py) and the model's surprise bookkeeping (msrnn/surprise.py).

Stepping, the chunked exact prefill and msrnn/reference.py are also held equal for `surprise` by the generic tests
(test_reference, test_scan, test_per_head iterate over every built-in policy); these are the specific ones."""
from __future__ import annotations

import pytest
import torch

from msrnn.batch import RowPolicies
from msrnn.errors import InputError
from msrnn.policies import INF, Surprise, make_policy
from msrnn.state import EMPTY, State
from test_reference import TOL, held, side_by_side, tiny


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_priority_keeps_sinks_and_recent_and_ranks_the_rest_by_surprise():
    pos = torch.arange(10)[None, None]  # (1, 1, 10)
    surprise = torch.tensor([[[9.0, 9.0, 1.0, 5.0, 0.5, 7.0, 2.0, INF, INF, INF]]])  # the newest 3: not known yet
    prio = Surprise(6, recent=3, sinks=1, span=2).priority(None, pos, torch.zeros(1, 1, 10), surprise=surprise)
    assert prio.tolist() == [[[INF, 9.0, 1.0, 5.0, 0.5, 7.0, 2.0, INF, INF, INF]]]
    # with per-kv-head positions (a head that has dropped other states), `recent` counts from each head's newest
    pos2 = torch.tensor([[[0, 3, 5, 8, 9], [0, 1, 2, 3, 9]]])
    prio2 = Surprise(4, recent=2, sinks=1).priority(None, pos2, torch.zeros(1, 2, 5), surprise=torch.ones(1, 2, 5))
    assert prio2.tolist() == [[[INF, 1, 1, INF, INF], [INF, 1, 1, 1, INF]]]


def test_surprise_is_the_largest_surprisal_in_the_span_as_the_unbounded_model_predicts_it():
    """With a budget above the prompt nothing is evicted, so the model is the causal transformer: the surprise of
    state t must be max(s_{t-2}, s_{t-1}, s_t), s_t = -log softmax(forward(x)[t-1])[x_t], s_0 = 0, in every layer
    and kv head, after stepping and after a chunked prefill alike."""
    model, ids = tiny(), torch.tensor([tokens(20)])
    logp = model.forward(ids)[0].log_softmax(-1)  # (T, V)
    s = torch.cat([torch.zeros(1), -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]])  # (T,)
    e = torch.stack([s[max(0, t - 2): t + 1].max() for t in range(20)])  # (T,) span 3
    policy = Surprise(40, recent=8, span=3)
    stepped = model.init_state(1, policy)
    for t in range(20):
        _, stepped = model.step(ids[:, t], stepped, policy)
    _, chunked = model.prefill(ids, None, policy, chunk=5)
    for state in (stepped, chunked):
        for layer in state.layers:
            pos = layer.pos[0, :, : layer.size]  # (Hkv, n)
            got = layer.surprise[0, :, : layer.size]
            torch.testing.assert_close(got, e[pos], rtol=0, atol=TOL)
    torch.testing.assert_close(stepped.last_logits, model.forward(ids)[:, -1], rtol=0, atol=TOL)


def test_prefill_never_feeds_more_than_recent_tokens_per_chunk_and_equals_the_reference():
    model, policy = tiny(), Surprise(10, recent=3, span=4)
    seen, real = [], model._advance
    model._advance = lambda chunk, *a, **k: seen.append(chunk.shape[1]) or real(chunk, *a, **k)
    model.prefill(torch.tensor([tokens(30, 1)]), None, policy, chunk=256)
    assert max(seen) == 3 and sum(seen) == 30
    model._advance = real
    side_by_side(model, tokens(30, 1), policy, chunk=256)  # logits and kept positions after every token
    side_by_side(tiny("mistral", window=4, seed=2), tokens(30, 2), make_policy("surprise", [[9, 5], [6, 12]]), chunk=4)


def test_a_saved_or_forked_state_continues_as_the_original(tmp_path):
    model, policy, ids = tiny(), Surprise(8, recent=3, span=3), torch.tensor([tokens(30, 3)])
    _, state = model.prefill(ids[:, :18], None, policy)
    state.save(tmp_path / "s.safetensors")
    copies = [state.fork(), State.load(tmp_path / "s.safetensors")]
    want, state = model.prefill(ids[:, 18:], state, policy, all_logits=True)
    for other in copies:
        got, other = model.prefill(ids[:, 18:], other, policy, all_logits=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert held(other) == held(state)


def test_rows_of_surprise_share_a_batch_with_other_policies():
    """RowPolicies: surprise rows beside TOVA rows decide as each would alone (the surprise of every row is
    recorded; only the rows that read it use it)."""
    model, ids = tiny(), torch.tensor([tokens(25, 4), tokens(25, 5)])
    members = [make_policy("surprise", 7), make_policy("tova", 5)]
    logits, state = model.prefill(ids.repeat(2, 1), None, RowPolicies(members, 2), all_logits=True)
    for i, member in enumerate(members):
        alone, own = model.prefill(ids, None, member, all_logits=True)
        torch.testing.assert_close(logits[2 * i : 2 * i + 2], alone, rtol=0, atol=TOL)
        assert [[{p for p in l.pos[2 * i + r, h, : l.size].tolist() if p != EMPTY} for h in range(2)]
                for l in state.layers for r in range(2)] == \
               [[{p for p in l.pos[r, h, : l.size].tolist() if p != EMPTY} for h in range(2)]
                for l in own.layers for r in range(2)]


def test_what_surprise_cannot_do_is_one_clear_error():
    model, ids = tiny(), torch.tensor([tokens(12)])
    with pytest.raises(InputError, match="fast prefill"):
        model.prefill(ids, None, make_policy("surprise", 6), mode="fast")
    with pytest.raises(InputError, match="rebase"):
        make_policy("surprise", 6, positions="rebase")
    with pytest.raises(InputError, match="rebase"):
        model.prefill(ids.repeat(2, 1), None, RowPolicies([make_policy("surprise", 6),
                                                           make_policy("tova", 6, positions="rebase")], 1))
    with pytest.raises(InputError, match="different spans"):
        model.prefill(ids.repeat(2, 1), None, RowPolicies([Surprise(6, span=2), Surprise(6, span=3)], 1))
    with pytest.raises(InputError, match="no room"):
        Surprise(8, recent=6, sinks=2)
    with pytest.raises(InputError, match="whole number"):
        make_policy("surprise(span=2.5)", 8)
    hf = pytest.importorskip("msrnn.hf")
    with pytest.raises(InputError, match="transformers cache cannot see"):
        hf.PolicyCache(make_policy("surprise", 8))


def test_the_eval_grid_scores_surprise_as_its_own_recurrence():
    """eval.score runs every member from a shared unevicting prefix (eval.prefix_state): the prefix of a surprise
    row must record its surprise too, even beside rows that do not read it, or its first evictions would rank the
    prefix's states by 0."""
    from msrnn.eval import score

    model, ids = tiny(), torch.tensor([tokens(40, 6)])
    policy = Surprise(12, recent=4, span=3)
    grid = score(model, ids, [make_policy("tova", 6), policy])[1].loss  # (B, T-1) beside TOVA, from a prefix
    logits, _ = model.prefill(ids, None, policy, all_logits=True)
    alone = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    torch.testing.assert_close(grid, alone, rtol=0, atol=TOL)


def test_bench_fills_a_surprise_state_exactly():
    """msrnn bench brings a state to a stream position with fast prefills, which refuse surprise: it fills a
    surprise state with exact ones, and the state holds its budget with every surprise known."""
    from msrnn import bench

    model, policy = tiny(), Surprise(8, recent=4, span=3)
    state = bench.advance(model, model.init_state(1, policy), policy, 40, chunk=16)
    assert int(state.next_pos[0]) == 40 and [layer.size for layer in state.layers] == [8, 8]
    assert all(bool(torch.isfinite(layer.surprise[:, :, : layer.size]).all()) for layer in state.layers)


def test_a_damaged_surprise_in_a_state_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    model, policy = tiny(), Surprise(8, recent=4, span=3)
    _, state = model.prefill(torch.tensor([tokens(20, 7)]), None, policy)
    path = tmp_path / "s.safetensors"
    state.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for name, bad in (("layers.1.surprise", torch.zeros(1, 2, 3)), ("last_logits", torch.zeros(2, 61))):
        t = load_file(str(path))
        t[name] = bad
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(InputError, match="damaged"):
            State.load(tmp_path / "bad.safetensors")
