"""RoPE: frequencies per scaling type (one per token where dynamic scaling needs it) and the position schemes."""
import torch

from msrnn.config import RopeConfig
from msrnn.rope import cos_sin, effective_positions, fused_turn, inv_frequencies, rotate, turn


def test_effective_positions_by_hand():
    pos = torch.tensor([5, 0, 100, -1, 1, 101, 40])  # slot order; -1 is an empty slot
    assert effective_positions(pos, "absolute")[[0, 1, 2, 4, 5, 6]].tolist() == [5, 0, 100, 1, 101, 40]
    assert effective_positions(pos, "shift")[[1, 4, 0, 6, 2, 5]].tolist() == [0, 1, 2, 3, 4, 5]
    ll = effective_positions(pos, "loglog")
    assert ll[[1, 4, 0]].tolist() == [0, 1, 5]  # gaps <= 10 stay exact
    gap = ll[6] - ll[0]  # true gap 35 -> 10 + ln ln 35 - ln ln 10
    assert abs(gap - (10 + torch.tensor(35.).log().log() - torch.tensor(10.).log().log())) < 1e-5
    assert ll[5] - ll[2] == 1 and ll[2] - ll[6] < 60 - 40  # neighbours stay neighbours, long jumps shrink


def test_per_token_lengths_give_each_token_the_frequencies_of_its_own_step():
    """The recurrence rotates token t with the frequencies of a call of length t + 1 (dynamic scaling grows them
    past the trained length); a chunk asks for all of them at once and must get exactly those."""
    rope = RopeConfig(type="dynamic", theta=10000.0, factor=2.0)
    lengths = torch.tensor([15, 16, 17, 20])  # max_position_embeddings 16: the first two are not scaled
    table = inv_frequencies(rope, 8, 16, lengths)
    assert table.shape == (4, 4)
    for row, n in zip(table, lengths.tolist()):
        assert torch.equal(row, inv_frequencies(rope, 8, 16, n))
    assert torch.equal(table[0], table[1]) and not torch.equal(table[1], table[2])
    same = inv_frequencies(rope, 8, 16, torch.tensor([3, 9, 16]))  # nothing scaled: one row for all
    assert same.shape == (4,) and torch.equal(same, inv_frequencies(rope, 8, 16, 0))
    default = RopeConfig(type="default", theta=10000.0)
    assert inv_frequencies(default, 8, 16, lengths).shape == (4,)  # only dynamic scaling depends on the length
    cos, _ = cos_sin(torch.tensor([[15, 16, 17, 20]]), table, torch.float32)  # (B, T) with (T, hd/2) -> (B, T, hd)
    assert cos.shape == (1, 4, 8)
    assert torch.equal(cos[0, 2], cos_sin(torch.tensor([17]), table[2], torch.float32)[0][0])


def test_effective_positions_of_rows_with_schemes_of_their_own():
    pos = torch.tensor([[5, -1, 100, 40], [5, -1, 100, 40], [7, 3, -1, 9]])  # (B=3, S=4)
    mixed = effective_positions(pos, ("absolute", "shift", "shift"))
    assert mixed[0].tolist() == [5, -1, 100, 40]  # absolute: the positions themselves (empty slots at -1)
    assert mixed[1:].tolist() == effective_positions(pos[1:], "shift").tolist() == [[0, -1, 2, 1], [1, 0, -1, 2]]
    assert effective_positions(pos, ("rebase",) * 3).tolist() == effective_positions(pos, "absolute").tolist()


def test_the_fused_turn_is_rotate_on_q_and_k_and_leaves_v_alone():
    """The step turns the whole q | k | v projection at once (rope.fused_turn + turn): bit for bit `rotate` on the
    q and k heads, the v heads untouched; with per-token frequencies (dynamic scaling) too."""
    g = torch.Generator().manual_seed(0)
    H, Hkv, hd = 4, 2, 16
    x = torch.randn(2, 5, H + 2 * Hkv, hd, generator=g)  # (B, T, heads of q | k | v, hd)
    pos = torch.tensor([[0, 1, 2, 3, 900], [7, 8, 9, 10, 11]])
    for inv_freq in (inv_frequencies(RopeConfig(), hd, 64), torch.rand(5, hd // 2, generator=g)):
        cos, sin = cos_sin(pos, inv_freq, torch.float32)  # (B, T, hd)
        out = turn(x, *fused_turn(cos, sin, H + Hkv, H + 2 * Hkv))
        assert torch.equal(out[:, :, : H + Hkv], rotate(x[:, :, : H + Hkv], cos[:, :, None], sin[:, :, None]))
        assert torch.equal(out[:, :, H + Hkv :], x[:, :, H + Hkv :])
