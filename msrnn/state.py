"""The multi-state: what a transformer carries from one token to the next.

Each layer holds a set of states, one per token it remembers: the token's key and value (per kv head), its absolute
position, and a score the policy may keep (e.g. H2O's accumulated attention). Unbounded, a layer remembers every token
and the model is exactly the causal transformer; a policy that keeps at most k states makes it a bounded RNN.

Layout: preallocated buffers of `capacity` slots; slots [0, size) are in use. Slot order means nothing, because every
state carries its position and the attention mask is built from positions. That is what lets eviction be cheap: the
evicted slot is overwritten by the newest state (mistral-inference's `pos % window` ring buffer, generalised to any
policy). A slot whose position is -1 is empty (padding, or a row that dropped more than another row).

`model.step` updates a State *in place* (copying every key and value per token would cost more than the token itself).
Use `state.fork()` to keep a copy, e.g. to branch a generation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InputError

EMPTY = -1  # position of an unused slot


@dataclass
class LayerState:
    keys: torch.Tensor  # (B, Hkv, C, hd) keys after RoPE at their absolute positions (raw keys if rope_at_use)
    values: torch.Tensor  # (B, Hkv, C, hd)
    pos: torch.Tensor  # (B, Hkv, C) int64 absolute position of each slot, EMPTY if unused
    score: torch.Tensor  # (B, Hkv, C) float32, the policy's running score of each slot
    size: int = 0  # slots in use: [0, size)
    maybe_empty: bool = True  # False only while no slot in [0, size) can be EMPTY (lets attention skip its mask)

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Add T new states: k, v (B, Hkv, T, hd), pos (B, T). The state grows n -> n + T."""
        T = k.shape[2]
        if self.size + T > self.capacity:
            self._grow(max(2 * self.capacity, self.size + T))
        new = slice(self.size, self.size + T)
        self.keys[:, :, new] = k
        self.values[:, :, new] = v
        self.pos[:, :, new] = pos[:, None, :]  # every kv head sees the same new tokens
        self.score[:, :, new] = 0.0
        self.size += T

    def _grow(self, capacity: int) -> None:
        """Reallocate with more slots (amortised doubling: no torch.cat per step)."""
        extra = capacity - self.capacity

        def pad(t: torch.Tensor, fill) -> torch.Tensor:
            shape = list(t.shape)
            shape[2] = extra
            return torch.cat([t, t.new_full(shape, fill)], dim=2)

        self.keys, self.values = pad(self.keys, 0), pad(self.values, 0)
        self.pos, self.score = pad(self.pos, EMPTY), pad(self.score, 0.0)

    def evict(self, priority: torch.Tensor, budget: int) -> None:
        """Keep at most `budget` states per row and kv head: those of highest priority; -inf means "drop now".

        priority: (B, 1 or Hkv, size) float; one row per kv head for head-wise policies, broadcast for layer-wise.
        """
        B, Hkv, n = self.pos.shape[0], self.pos.shape[1], self.size
        prio = priority.expand(B, Hkv, n)
        if self.maybe_empty:
            prio = prio.masked_fill(self.pos[:, :, :n] == EMPTY, float("-inf"))
        drop = prio == float("-inf")  # (B, Hkv, n) states to drop whatever the budget
        if n == budget + 1 and not drop.any():
            # The recurrence's steady state: one state out, the newest (slot n-1) moves into its slot.
            slot = prio.argmin(dim=-1)  # (B, Hkv) the state to drop; may be the newest itself
            newest = n - 1
            for buf in (self.keys, self.values):  # (B, Hkv, C, hd)
                src = buf[:, :, newest : newest + 1].clone()  # (B, Hkv, 1, hd)
                buf.scatter_(2, slot[:, :, None, None].expand_as(src), src)
            for buf in (self.pos, self.score):  # (B, Hkv, C)
                buf.scatter_(2, slot[:, :, None], buf[:, :, newest : newest + 1].clone())
            self.size = budget
            return
        # General case (prefill's one-shot eviction, resets, padding): the top `budget` of what may stay.
        kept = min(budget, int((~drop).sum(-1).max()))
        idx = prio.topk(kept, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, kept) slots to keep, in slot order
        dropped = drop.gather(-1, idx)  # (B, Hkv, kept) a row with fewer survivors than another pads with holes
        for buf in (self.keys, self.values):
            buf[:, :, :kept] = buf.gather(2, idx[..., None].expand(-1, -1, -1, buf.shape[-1]))
        self.pos[:, :, :kept] = self.pos.gather(2, idx).masked_fill(dropped, EMPTY)
        self.score[:, :, :kept] = self.score.gather(2, idx)
        self.size = kept
        self.maybe_empty = self.maybe_empty or bool(dropped.any())

    def copy(self) -> "LayerState":
        return LayerState(self.keys.clone(), self.values.clone(), self.pos.clone(), self.score.clone(), self.size,
                          self.maybe_empty)


@dataclass
class State:
    """The multi-state of a whole model: one LayerState per layer, and each row's next absolute position."""

    layers: list[LayerState]
    next_pos: torch.Tensor  # (B,) int64 the position the next token of each row will get
    rope_at_use: bool = False  # keys cached un-rotated, rotated at use (the `shift` and `loglog` position schemes)
    meta: dict = field(default_factory=dict)  # model identity, policy name and budget (for save/load checks)

    @classmethod
    def empty(cls, num_layers, batch_size, kv_heads, head_dim, capacity, dtype, rope_at_use=False, meta=None):
        def layer() -> LayerState:
            return LayerState(
                keys=torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype),
                values=torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype),
                pos=torch.full((batch_size, kv_heads, capacity), EMPTY, dtype=torch.int64),
                score=torch.zeros(batch_size, kv_heads, capacity, dtype=torch.float32),
                maybe_empty=False,  # slots are filled in order from 0 by append
            )

        next_pos = torch.zeros(batch_size, dtype=torch.int64)
        return cls([layer() for _ in range(num_layers)], next_pos, rope_at_use, dict(meta or {}))

    @property
    def batch_size(self) -> int:
        return self.next_pos.shape[0]

    @property
    def size(self) -> int:
        """States held per layer (the same in every layer for the built-in policies): n in the paper."""
        return max(layer.size for layer in self.layers)

    @property
    def sizes(self) -> list[int]:
        return [layer.size for layer in self.layers]

    def __len__(self) -> int:
        return self.size

    def fork(self) -> "State":
        """An independent copy (no shared storage): continue both and they diverge."""
        return State([l.copy() for l in self.layers], self.next_pos.clone(), self.rope_at_use, dict(self.meta))

    copy = fork

    def nbytes(self) -> int:
        """Bytes held by the keys and values in use (what a policy's budget bounds)."""
        return sum(l.size * l.keys[:, :, :1].nelement() * l.keys.element_size() * 2 for l in self.layers)

    # --- persistence: safetensors (never pickle), metadata as JSON -------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {"next_pos": self.next_pos.contiguous()}
        for i, l in enumerate(self.layers):
            n = l.size
            tensors.update({
                f"layers.{i}.keys": l.keys[:, :, :n].contiguous(),
                f"layers.{i}.values": l.values[:, :, :n].contiguous(),
                f"layers.{i}.pos": l.pos[:, :, :n].contiguous(),
                f"layers.{i}.score": l.score[:, :, :n].contiguous(),
            })
        meta = {"msrnn_state": json.dumps({"rope_at_use": self.rope_at_use, "meta": self.meta,
                                           "num_layers": len(self.layers)})}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "State":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path} does not exist: pass the file written by state.save(path).")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["msrnn_state"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, json.JSONDecodeError, OSError, Exception) as e:  # safetensors raises its own error types
            raise InputError(f"{path} is not a msrnn state file ({type(e).__name__}: {e}).") from None
        layers = []
        for i in range(header["num_layers"]):
            k, v, p, s = (t[f"layers.{i}.{name}"] for name in ("keys", "values", "pos", "score"))
            layers.append(LayerState(k, v, p, s, size=k.shape[2]))
        return cls(layers, t["next_pos"], header["rope_at_use"], header["meta"])
