"""Rotary position embedding (RoPE), in the "rotate-half" layout of Hugging Face Llama.

A key at absolute position t is rotated once, when it enters the multi-state, and cached rotated: the state holds
keys *after* RoPE (TOVA's and transformers' convention). Pair i of a head's dimensions is the couple (x[i], x[i + hd/2])
and turns by the angle t * inv_freq[i].

Scaling types change only `inv_freq`:
- default:  inv_freq[i] = theta^(-2i/hd)
- linear:   divided by `factor` (positions squeezed by factor)
- dynamic:  NTK-aware: theta grows with the sequence length once it passes max_position_embeddings; the length is the
            one of the forward pass that computes the rotation (transformers' rule), so a key keeps the rotation it got
            when it was cached
- llama3:   long wavelengths divided by `factor`, short ones kept, a smooth blend between (Llama 3.1)
"""
from __future__ import annotations

import itertools
import math

import torch

from .config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len=0) -> torch.Tensor:
    """(hd/2,) float32 angular speed of each rotated pair. `seq_len` matters only for dynamic scaling; a tensor of
    lengths (T,) (one per token) gives (T, hd/2) when they scale differently."""
    if isinstance(seq_len, torch.Tensor):
        lengths = seq_len.clamp(min=max_position_embeddings).tolist() if rope.type == "dynamic" else [0]
        if len(set(lengths)) == 1:
            return inv_frequencies(rope, head_dim, max_position_embeddings, int(lengths[0]))
        return torch.stack([inv_frequencies(rope, head_dim, max_position_embeddings, int(n)) for n in lengths])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (hd/2,)
    theta = rope.theta
    if rope.type == "dynamic":
        seq_len = max(seq_len, max_position_embeddings)  # no scaling inside the trained context
        theta = theta * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)  # long waves slowed
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (..., hd), computed in float32 and then cast (as transformers does)."""
    angles = positions[..., None].float() * inv_freq  # (..., hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., hd): the same angle for x[i] and x[i + hd/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., hd) turned by the angles behind cos/sin (broadcastable to x): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (-x2, x1)
    return x * cos + rotated_half * sin


def fused_turn(cos: torch.Tensor, sin: torch.Tensor, turned: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, hd) -> tables (B, T, heads, hd) that turn a fused projection's first `turned` heads (q | k)
    with `turn` and leave the rest (v) as they are (cos 1, sin 0), so that one `turn` rotates the whole q | k | v
    of a layer in 4 operations, once per step for all layers. sin's first half is negated: rotate_half(x) * sin is
    then roll(x, hd/2) * sin, bit for bit ((-x2) * s = x2 * (-s))."""
    B, T, hd = cos.shape
    signed = torch.cat((-sin[..., : hd // 2], sin[..., hd // 2 :]), dim=-1)  # (B, T, hd)
    c = torch.ones(B, T, heads, hd, dtype=cos.dtype, device=cos.device)
    s = torch.zeros(B, T, heads, hd, dtype=sin.dtype, device=sin.device)
    c[:, :, :turned], s[:, :, :turned] = cos[:, :, None], signed[:, :, None]
    return c, s


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`rotate` with tables from `fused_turn`: x*cos + roll(x)*sin, roll(x) = (x2, x1) (the same products and sum)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


LOGLOG_LINEAR = 10  # gaps up to this many tokens keep their exact length under the loglog scheme
AT_USE = ("shift", "loglog")  # schemes whose keys are cached un-rotated and rotated at every use
# absolute: keys rotated once at their stream position. rebase: the same, but when the next position would reach the
# trained context the held states are renumbered 0..n-1 (model.Transformer._rebase), so no distance ever passes it.
CACHED = ("absolute", "rebase")


def rotates_at_use(scheme) -> bool:
    """True if keys are cached before rotation: a scheme of AT_USE, or a per-row tuple of schemes holding one (a
    batch mixing the two kinds rotates every row at use; an absolute row then gets its own positions back)."""
    return any(s in AT_USE for s in ((scheme,) if isinstance(scheme, str) else scheme))


def compress_gap(gap: torch.Tensor, scheme: str) -> torch.Tensor:
    """How far apart two neighbouring kept states are made to look, given their true distance `gap` (>= 0)."""
    gap = gap.float()
    if scheme in CACHED:
        return gap
    if scheme == "shift":
        return gap.clamp(max=1)  # neighbours in the state are neighbours in position (StreamingLLM)
    # loglog: exact up to LOGLOG_LINEAR, then growing like ln(ln(gap)); continuous and increasing in the gap.
    big = LOGLOG_LINEAR + torch.log(torch.log(gap.clamp(min=LOGLOG_LINEAR))) - math.log(math.log(LOGLOG_LINEAR))
    return torch.where(gap <= LOGLOG_LINEAR, gap, big)


def effective_positions(pos: torch.Tensor, scheme) -> torch.Tensor:
    """Positions the kept states are rotated at, (B, ..., S) float, from their absolute positions pos (B, ..., S).

    Walk the kept states in position order from a virtual origin at -1; each step advances by the compressed gap.
    absolute: the positions themselves. shift: 0, 1, 2, ... in position order. loglog: long jumps shrunk.
    Empty slots (pos == -1) get gap 0 and are masked out anyway. `scheme` may be a tuple of one scheme per row
    (RowPolicies mixing schemes): each run of rows with one scheme is computed on its own.
    """
    if not isinstance(scheme, str):
        out, first = torch.empty(pos.shape, device=pos.device), 0
        for name, run in itertools.groupby(scheme):
            end = first + len(list(run))
            out[first:end] = effective_positions(pos[first:end], name)
            first = end
        return out
    order = pos.argsort(dim=-1)  # (..., S) empty slots (-1) first, then increasing positions
    sorted_pos = pos.gather(-1, order)
    prev = torch.cat([torch.full_like(sorted_pos[..., :1], -1), sorted_pos[..., :-1]], dim=-1)
    eff_sorted = compress_gap(sorted_pos - prev, scheme).cumsum(-1) - 1  # (..., S)
    return torch.empty_like(eff_sorted).scatter_(-1, order, eff_sorted)  # back to slot order
