"""SnapKV in msrnn's policy contract: its equation checked by hand on plain tensors, and on a tiny model against
SnapKV's algorithm written out from transformers' own attention probabilities (the official code's recipe)."""
import tempfile

import pytest
import torch
import torch.nn.functional as F

import msrnn
from msrnn.errors import InputError
from msrnn.policies import SnapKV, make_policy
from msrnn.state import LayerState
from tiny import hf_model, save


def layer_state(pos):
    B, Hkv, n = pos.shape
    keys = pos[..., None].float().expand(B, Hkv, n, 2).clone()
    return LayerState(keys, keys.clone(), pos.clone(), torch.zeros(B, Hkv, n), size=n)


def test_votes_pooling_and_window_by_hand():
    p = SnapKV(4, window=2, kernel=3)
    # one row, one head, 8 states at positions 0..7; three new queries, the last two are the observation window
    attn = torch.tensor([[[[1.0, 0, 0, 0, 0, 0, 0, 0],  # outside the window: no vote
                           [0, 0.5, 0, 0.2, 0.3, 0, 0, 0],
                           [0, 0.4, 0, 0.3, 0.2, 0, 0.1, 0]]]])  # (B, H, T=3, n=8)
    score = p.update(torch.zeros(1, 1, 8), attn)
    assert torch.allclose(score, torch.tensor([[[0, 0.9, 0, 0.5, 0.5, 0, 0.1, 0]]]))  # C_j
    pos = torch.arange(8)[None, None]
    prio = p.priority(None, pos, score)
    # P_j = (C_{j-1} + C_j + C_{j+1}) / 3 over the prefix 0..5 (the window's votes are not pooled, 0 past the ends)
    expected = torch.tensor([0.3, 0.3, 1.4 / 3, 1.0 / 3, 1.0 / 3, 0.5 / 3])
    assert torch.allclose(prio[0, 0, :6], expected) and prio[0, 0, 6:].isinf().all()
    state = layer_state(pos)
    state.evict(prio, 4)
    # raw votes would keep position 1 (0.9); pooled, 2 wins and 3, 4 tie (the newest, 4, stays)
    assert sorted(state.pos[0, 0, :4].tolist()) == [2, 4, 6, 7]


def test_slots_in_any_order_and_per_kv_head():
    p = SnapKV(3, window=1, kernel=3)
    pos = torch.tensor([[[3, 0, 2, 1], [1, 3, 0, 2]]])  # two kv heads, slots shuffled differently
    by_pos = torch.tensor([0.0, 0.6, 0.0, 0.3])  # votes of positions 0..3 (3 is the window)
    score = by_pos[pos]
    prio = p.priority(None, pos, score)
    pooled = torch.tensor([0.2, 0.2, 0.2, float("inf")])  # (0+0+.6)/3, (0+.6+0)/3, (.6+0+0)/3; 3 kept
    assert torch.allclose(prio, pooled[pos])


def test_bad_settings_are_clear():
    with pytest.raises(InputError, match="window"):
        SnapKV(4, window=4)
    with pytest.raises(InputError, match="kernel"):
        SnapKV(8, kernel=4)
    assert make_policy("snapkv(window=3, kernel=3)", 8).window == 3
    assert SnapKV(256).window == 32 and SnapKV(10).window == 5


def test_fast_prefill_keeps_what_snapkv_selects_from_the_attention():
    """One fast prefill on a tiny model: every layer keeps, per kv head, the window plus the top k - w of the
    avg-pooled votes, computed here from transformers' eager attention exactly as SnapKV's own code does."""
    hf = hf_model("llama", seed=5)
    with tempfile.TemporaryDirectory() as d:
        model = msrnn.load_model(save(hf, d))
    T, k, w, s = 24, 10, 4, 5
    ids = torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(2))
    _, state = model.prefill(ids, policy=SnapKV(k, window=w, kernel=s), mode="fast")
    with torch.no_grad():
        attentions = hf(ids, output_attentions=True).attentions  # per layer (B, H, T, T)
    Hkv = hf.config.num_key_value_heads
    for layer, a in zip(state.layers, attentions):
        votes = a[:, :, -w:, :-w].sum(dim=2)  # (B, H, T-w): the window's votes for the prefix
        votes = votes.view(1, Hkv, -1, T - w).sum(dim=2)  # (B, Hkv, T-w) over each kv head's query heads
        pooled = F.avg_pool1d(votes, s, stride=1, padding=s // 2)
        top = pooled.topk(k - w, dim=-1).indices  # (B, Hkv, k-w)
        for h in range(Hkv):
            expected = sorted(top[0, h].tolist() + list(range(T - w, T)))
            assert sorted(layer.pos[0, h, : layer.size].tolist()) == expected
