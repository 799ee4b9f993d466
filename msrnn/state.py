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
from typing import Callable

import torch

from .errors import InputError

EMPTY = -1  # position of an unused slot
INF = float("inf")
OLDEST_SENTINEL = 2**62  # larger than any position: a slot that is not a candidate for eviction


def l1_norms(values: torch.Tensor) -> torch.Tensor:
    """values (B, Hkv, n, hd) -> (B, Hkv, n) fp32: the L1 norm of each state's value, per kv head."""
    return values.float().abs().sum(dim=-1)


def oldest_lowest(prio: torch.Tensor, pos: torch.Tensor, hidden: torch.Tensor | None = None, lowest: bool = False):
    """(B, Hkv, 1) the slot of each row's lowest priority, the oldest of equals (the recurrence's tie rule); prio and
    pos (B, Hkv, n), with the slots in `hidden` (EMPTY) given priority INF beforehand and never chosen. lowest=True:
    (slot, that lowest priority (B, Hkv, 1)), NaN where a priority was NaN."""
    low = prio.amin(dim=-1, keepdim=True)  # (B, Hkv, 1)
    others = prio != low if hidden is None else (prio != low) | hidden
    slot = pos.masked_fill(others, OLDEST_SENTINEL).argmin(dim=-1, keepdim=True)
    return (slot, low) if lowest else slot


@dataclass
class LayerState:
    keys: torch.Tensor  # (B, Hkv, C, hd) keys after RoPE at their absolute positions (raw keys if rope_at_use)
    values: torch.Tensor  # (B, Hkv, C, hd)
    pos: torch.Tensor  # (B, Hkv, C) int64 absolute position of each slot, EMPTY if unused
    score: torch.Tensor  # (B, Hkv, C) float32, the policy's running score of each slot
    size: int = 0  # slots in use: [0, size)
    maybe_empty: bool = True  # False only while no slot in [0, size) can be EMPTY (lets attention skip its mask)
    # trace(step, pos): called by the model after each step that may have evicted, with the newest position of each
    # row (B,) and the positions then held (B, Hkv, n), EMPTY = not held (msrnn.inspect records retention with it)
    trace: Callable | None = field(default=None, repr=False, compare=False)
    # unranked: the lowest priority of each row and kv head (B, Hkv, 1) in the last ring_step, NaN where the policy
    # returned a NaN priority (amin propagates it); checked by the model once per step for all layers (a host sync
    # per layer would split a compiled step); None when nothing is pending
    unranked: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # norms (B, Hkv, C) fp32: l1_norms(values) of every slot, kept only once a policy has asked (value_norms());
    # a value never changes while its state is held, so its norm is computed when it enters and moves with its slot
    norms: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # full_at: the states each kv head holds, the same in every row, as compact() last counted them (replace_lowest
    # keeps it true: one in, one out); lets a layer with budgets per kv head take the one-slot decode step
    full_at: tuple | None = field(default=None, repr=False, compare=False)
    # surprise (B, Hkv, C) fp32: each state's episode surprise (msrnn/surprise.py), kept only once a policy that
    # needs_surprise has run; +inf from when a state enters until the model writes it after the call
    surprise: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.size

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def value_norms(self) -> torch.Tensor:
        """(B, Hkv, size) the L1 norm of each held value per kv head, for a policy that weighs states by their values
        (needs_value_norms: tova-value). Computed for every slot on the first call; from then on append computes it
        for the entering states only and every move of a slot moves it too, so a step never re-reads all values."""
        if self.norms is None:
            self.norms = l1_norms(self.values)  # (B, Hkv, C)
        return self.norms[:, :, : self.size]

    def surprises(self) -> torch.Tensor:
        """(B, Hkv, C) the surprise buffer (msrnn/surprise.py), made on first use: 0 for the states held before
        (what was read without a surprise-reading policy is not known to have surprised)."""
        if self.surprise is None:
            self.surprise = torch.zeros(self.pos.shape, device=self.pos.device)  # (B, Hkv, C)
        return self.surprise

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Add T new states: k, v (B, Hkv, T, hd), pos (B, T). The state grows n -> n + T (one spare slot is kept
        free behind them: eviction writes there when a row has nothing to drop)."""
        T = k.shape[2]
        if self.size + T + 1 > self.capacity:
            self._grow(max(2 * self.capacity, self.size + T + 1))
        new = slice(self.size, self.size + T)
        self.keys[:, :, new] = k
        self.values[:, :, new] = v
        self.pos[:, :, new].copy_(pos[:, None])  # every kv head sees the same new tokens
        self.score[:, :, new].zero_()
        if self.norms is not None:
            self.norms[:, :, new] = l1_norms(self.values[:, :, new])  # (B, Hkv, T) of the values as stored
        if self.surprise is not None:
            self.surprise[:, :, new] = INF  # not known until the call's logits are (surprise.record)
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
        if self.norms is not None:
            self.norms = pad(self.norms, 0.0)  # the norm of the zero values padded in
        if self.surprise is not None:
            self.surprise = pad(self.surprise, 0.0)

    def shrink(self, capacity: int) -> None:
        """Give back the slots a chunk grew the layer by, down to `capacity` if the states held fit (with the spare
        slot): the decode steps that follow then read and write buffers of k + 2 slots, not k + a chunk."""
        if self.capacity > capacity >= self.size + 1:
            self.keys, self.values, self.pos, self.score = (
                t[:, :, :capacity].clone() for t in (self.keys, self.values, self.pos, self.score))
            if self.norms is not None:
                self.norms = self.norms[:, :, :capacity].clone()
            if self.surprise is not None:
                self.surprise = self.surprise[:, :, :capacity].clone()

    def sort_by_position(self) -> None:
        """Reorder slots [0, size) by position (empty slots first). The layer-major scan starts from this order, so
        that the first of equal priorities is the oldest state (exact ties drop the oldest, as drop_lowest does)."""
        n = self.size
        order = self.pos[:, :, :n].argsort(dim=-1, stable=True)  # (B, Hkv, n)
        for buf in (self.keys, self.values):
            buf[:, :, :n] = buf[:, :, :n].gather(2, order[..., None].expand(-1, -1, -1, buf.shape[-1]))
        for buf in self._per_slot():
            buf[:, :, :n] = buf[:, :, :n].gather(2, order)

    # --- eviction: a state leaves by getting position EMPTY; compact() then reuses its slot ----------------------
    def drop_lowest(self, priority: torch.Tensor, budget, hidden: torch.Tensor) -> None:
        """One step of the bounded recurrence: every row and kv head that holds more than `budget` live states (at
        most one more, the newest having just entered) drops its state of lowest priority; ties drop the oldest.
        A row over budget drops all its states of priority -inf at once. Positions only: no key or value moves.

        priority (B, 1 or Hkv, n) float; budget an int or (B, 1, 1) per row; hidden (B, Hkv, n) bool, the slots
        that hold no state now (EMPTY)."""
        n = self.size
        budget = budget.to(self.pos.device) if isinstance(budget, torch.Tensor) else budget
        pos = self.pos[:, :, :n]  # (B, Hkv, n) a view: writing EMPTY into it evicts
        prio = priority.float().expand(pos.shape).masked_fill(hidden, INF)  # empty slots are never the lowest
        over = hidden.sum(dim=-1, keepdim=True) < n - budget  # (B, Hkv, 1) live states > budget
        pos.masked_fill_((prio == -INF) & over, EMPTY)  # "drop now" (baseline): then the row is within budget
        oldest = oldest_lowest(prio, pos, hidden)  # (B, Hkv, 1)
        spare = torch.full_like(oldest, n)  # slot n is free (append keeps it so): a row under budget writes there
        self.pos.scatter_(2, torch.where(over, oldest, spare), EMPTY)

    def holds_exactly(self, policy) -> bool:
        """The layer is full: it holds its policy's one budget k in slots [0, k), none of them empty, and the
        policy never asks to "drop now" (so one token in means exactly one state out: see replace_lowest)."""
        heads = policy.heads  # budgets per kv head: each head full to its own, the smaller ones with EMPTY holes
        if heads is not None:  # full_at is counted only when heads (or rows) may differ; else each holds `size`
            held = self.full_at if self.maybe_empty else (self.size,) * self.pos.shape[1]
            return held == heads and self.size == max(heads) and not policy.drops
        budget = policy.budget()  # (B, 1, 1) when rows have budgets of their own: the general path
        return isinstance(budget, int) and self.size == budget and not self.maybe_empty and not policy.drops

    def replace_lowest(self, priority: torch.Tensor) -> torch.Tensor:
        """The recurrence's eviction in a full layer whose newest state sits in the last slot: the state of lowest
        priority (ties: the oldest) leaves, and the newest moves into its slot (or leaves itself, if it is the
        lowest). One slot written per row and kv head. priority (B, 1 or Hkv, n) float. EMPTY slots (the holes of
        a kv head whose budget is smaller than the layer's largest) are never chosen. Returns the lowest priority
        of each row and kv head (B, Hkv, 1): NaN where the policy gave a NaN (the caller's check, no host sync here)."""
        n, hd = self.size, self.keys.shape[-1]
        pos = self.pos[:, :, :n]  # (B, Hkv, n)
        prio, hidden = priority.float().expand(pos.shape), None
        if self.maybe_empty:
            hidden = pos == EMPTY
            prio = prio.masked_fill(hidden, INF)
        slot, low = oldest_lowest(prio, pos, hidden, lowest=True)  # (B, Hkv, 1) each
        for buf in (self.keys, self.values):  # (B, Hkv, C, hd)
            buf.scatter_(2, slot[..., None].expand(-1, -1, -1, hd), buf[:, :, n - 1 : n].clone())
        for buf in self._per_slot():  # (B, Hkv, C)
            buf.scatter_(2, slot, buf[:, :, n - 1 : n].clone())
        self.pos[:, :, n - 1].fill_(EMPTY)
        self.size = n - 1
        return low

    def keep_top(self, priority: torch.Tensor, budget) -> None:
        """Keep in every row and kv head its `budget` live states of highest priority (ties keep the newest) and
        drop the rest; a row over budget also drops every state of priority -inf. For any number of states over
        budget (a fast prefill's single eviction, a state continued under a smaller budget)."""
        n = self.size
        budget = budget.to(self.pos.device) if isinstance(budget, torch.Tensor) else budget
        pos = self.pos[:, :, :n]  # (B, Hkv, n)
        live = pos != EMPTY
        prio = priority.float().expand(pos.shape).masked_fill(~live, -INF)
        by_age = pos.argsort(dim=-1, descending=True, stable=True)  # newest first ...
        order = by_age.gather(-1, prio.gather(-1, by_age).argsort(dim=-1, descending=True, stable=True))  # ... by prio
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=pos.device).expand_as(order))
        over = live.sum(dim=-1, keepdim=True) > budget  # (B, Hkv, 1) rows that must give states up
        pos.masked_fill_(live & ((rank >= budget) | ((prio == -INF) & over)), EMPTY)

    def evict(self, priority: torch.Tensor, budget) -> None:
        """Keep at most `budget` states per row and kv head, those of highest priority (-inf: drop now), and
        reuse the freed slots. priority (B, 1 or Hkv, size)."""
        self.keep_top(priority, budget)
        self.compact()

    def compact(self) -> None:
        """Give the slots of evicted states to the newest survivors, so the layer needs only as many slots as its
        fullest row holds states. The survivors above that line move into the holes below it, in order: for the
        recurrence (one token in, one out) this is mistral-inference's ring buffer, the newest overwriting the
        evicted slot. Rows that hold fewer states keep EMPTY holes, which attention masks out."""
        n = self.size
        live = self.pos[:, :, :n] != EMPTY  # (B, Hkv, n)
        counts = live.sum(dim=-1)  # (B, Hkv)
        size = int(counts.max()) if n else 0
        self.maybe_empty = bool((counts < size).any())
        # per kv head, when they differ (budgets per head): two host syncs that a layer of one budget never makes
        self.full_at = tuple(counts[0].tolist()) if self.maybe_empty and bool((counts == counts[:1]).all()) else None
        if size == n:
            return
        slot = torch.arange(n, device=self.pos.device)
        mover = live[:, :, size:]  # (B, Hkv, n - size) survivors above the line
        if n - size == 1:  # the recurrence's step: one survivor at most, into the row's one hole (the ring buffer)
            hole = (~live[:, :, :size]).to(torch.int8).argmax(dim=-1, keepdim=True)  # (B, Hkv, 1)
            target = torch.where(mover, hole, size)
        else:
            hole = ~live & (slot < size)  # (B, Hkv, n) free slots below the line
            holes_first = (~hole).to(torch.int8).argsort(dim=-1, stable=True)  # (B, Hkv, n) holes, in order, first
            rank = mover.cumsum(dim=-1) - 1  # (B, Hkv, n - size) i-th mover -> i-th hole
            target = torch.where(mover, holes_first.gather(-1, rank.clamp(min=0)), slot[size:])  # others stay put
        for buf in (self.keys, self.values):  # (B, Hkv, C, hd)
            src = buf[:, :, size:n].clone()
            buf.scatter_(2, target[..., None].expand_as(src), src)
        for buf in self._per_slot():  # (B, Hkv, C)
            buf.scatter_(2, target, buf[:, :, size:n].clone())
        self.pos[:, :, size:] = EMPTY
        self.size = size

    def _per_slot(self) -> tuple[torch.Tensor, ...]:
        """The (B, Hkv, C) buffers that move with their slot: positions, scores, value norms and surprise if kept."""
        return tuple(b for b in (self.pos, self.score, self.norms, self.surprise) if b is not None)

    def copy(self) -> "LayerState":
        return LayerState(self.keys.clone(), self.values.clone(), self.pos.clone(), self.score.clone(), self.size,
                          self.maybe_empty, norms=None if self.norms is None else self.norms.clone(),
                          surprise=None if self.surprise is None else self.surprise.clone(),
                          full_at=self.full_at)  # a fork of a full layer takes the one-slot step at once


@dataclass
class State:
    """The multi-state of a whole model: one LayerState per layer, and each row's next absolute position."""

    layers: list[LayerState]
    next_pos: torch.Tensor  # (B,) int64 the position the next token of each row will get
    rope_at_use: bool = False  # keys cached un-rotated, rotated at use (the `shift` and `loglog` position schemes)
    meta: dict = field(default_factory=dict)  # model identity, policy name and budget (for save/load checks)
    # what a surprise-reading policy's next call needs (msrnn/surprise.py): the last logits (B, vocab) fp32, the
    # prediction of the next token, and the last span - 1 surprisals (B, span - 1); None until such a call
    last_logits: torch.Tensor | None = field(default=None, repr=False, compare=False)
    surprise_tail: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, num_layers, batch_size, kv_heads, head_dim, capacity, dtype, rope_at_use=False, meta=None,
              device=None):
        """capacity: slots per layer, one int for all or a list (budgets per layer, PyramidKV)."""
        def layer(capacity) -> LayerState:
            return LayerState(
                keys=torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                values=torch.zeros(batch_size, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                pos=torch.full((batch_size, kv_heads, capacity), EMPTY, dtype=torch.int64, device=device),
                score=torch.zeros(batch_size, kv_heads, capacity, dtype=torch.float32, device=device),
                maybe_empty=False,  # slots are filled in order from 0 by append
            )

        capacities = capacity if isinstance(capacity, (list, tuple)) else [capacity] * num_layers
        next_pos = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls([layer(c) for c in capacities], next_pos, rope_at_use, dict(meta or {}))

    @classmethod
    def stack(cls, states: list["State"]) -> "State":
        """One batch state from states of any sizes (rows in order; copies, so a state may appear twice). A row
        with fewer states than the largest gets EMPTY slots (position -1): invisible to attention, never evicted."""
        first = states[0]
        if any(s.rope_at_use != first.rope_at_use or len(s.layers) != len(first.layers) for s in states):
            raise InputError("cannot stack states made by different models or position schemes.")
        layers = [_stack_layers([s.layers[i] for s in states]) for i in range(len(first.layers))]
        out = cls(layers, torch.cat([s.next_pos for s in states]), first.rope_at_use, dict(first.meta))
        if any(s.last_logits is not None for s in states):  # a row that has none: NaN logits, 0 surprise (record)
            have = next(s for s in states if s.last_logits is not None)
            out.last_logits = torch.cat([s.last_logits if s.last_logits is not None else
                                         have.last_logits.new_full((s.batch_size, have.last_logits.shape[1]), torch.nan)
                                         for s in states])
        tails = {s.surprise_tail.shape[1] for s in states if s.surprise_tail is not None}
        if len(tails) == 1:  # a row that has none: zeros (no surprise before)
            width = tails.pop()
            out.surprise_tail = torch.cat([s.surprise_tail if s.surprise_tail is not None else
                                           torch.zeros(s.batch_size, width, device=s.next_pos.device) for s in states])
        return out

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
        out = State([l.copy() for l in self.layers], self.next_pos.clone(), self.rope_at_use, dict(self.meta))
        out.last_logits, out.surprise_tail = (None if t is None else t.clone() for t in (self.last_logits,
                                                                                        self.surprise_tail))
        return out

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
            if l.surprise is not None:
                tensors[f"layers.{i}.surprise"] = l.surprise[:, :, :n].contiguous()
        for name in ("last_logits", "surprise_tail"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name).contiguous()
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
        try:
            layers = [LayerState(*(t[f"layers.{i}.{name}"] for name in ("keys", "values", "pos", "score")))
                      for i in range(int(header["num_layers"]))]
            state = cls(layers, t["next_pos"], bool(header["rope_at_use"]), dict(header["meta"]))
            for i, layer in enumerate(layers):
                layer.surprise = t.get(f"layers.{i}.surprise")
            state.last_logits, state.surprise_tail = t.get("last_logits"), t.get("surprise_tail")
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path} is not a complete msrnn state file (missing {e}); save it again.") from None
        problem = state._problem()
        if problem:
            raise InputError(f"{path} is damaged: {problem}. Save the state again with state.save(path).")
        for layer in state.layers:
            layer.size = layer.keys.shape[2]
            layer.maybe_empty = bool((layer.pos == EMPTY).any())
        return state

    def _problem(self) -> str | None:
        """What is wrong with a loaded state, if anything: shapes, dtypes, positions of every layer."""
        nxt = self.next_pos
        if nxt.dim() != 1 or nxt.dtype != torch.int64 or bool((nxt < 0).any()):
            return f"next_pos must be non-negative int64 of shape (batch,), got {nxt.dtype} {tuple(nxt.shape)}"
        if not self.layers:
            return "it holds no layer"
        for name in ("last_logits", "surprise_tail"):  # what a surprise-reading policy continues from
            t = getattr(self, name)
            if t is not None and (t.dim() != 2 or t.shape[0] != nxt.shape[0] or not t.is_floating_point()):
                return f"{name} has shape {tuple(t.shape)}, not ({nxt.shape[0]}, ...)"
        if self.layers[0].keys.dim() != 4:
            return f"layer 0's keys have shape {tuple(self.layers[0].keys.shape)}, not (batch, kv heads, n, head_dim)"
        B, (Hkv, hd) = nxt.shape[0], (self.layers[0].keys.shape[1], self.layers[0].keys.shape[-1])
        for i, layer in enumerate(self.layers):
            k, v, pos, score = layer.keys, layer.values, layer.pos, layer.score
            n = k.shape[2] if k.dim() == 4 else -1
            if k.dim() != 4 or k.shape != (B, Hkv, n, hd) or v.shape != k.shape:
                return f"layer {i}'s keys/values have shapes {tuple(k.shape)}/{tuple(v.shape)}, not ({B}, {Hkv}, n, {hd})"
            if pos.shape != (B, Hkv, n) or score.shape != (B, Hkv, n):
                return f"layer {i}'s positions/scores have shapes {tuple(pos.shape)}/{tuple(score.shape)}, not ({B}, {Hkv}, {n})"
            if not k.is_floating_point() or v.dtype != k.dtype or pos.dtype != torch.int64 or score.dtype != torch.float32:
                return f"layer {i} holds {k.dtype}/{v.dtype} keys/values, {pos.dtype} positions, {score.dtype} scores"
            held = pos != EMPTY
            if bool((held & ((pos < 0) | (pos >= nxt[:, None, None]))).any()):
                return f"layer {i} holds positions outside 0..next_pos-1 (or below -1)"
            ordered = pos.masked_fill(~held, -1).sort(dim=-1).values  # duplicates are neighbours once sorted
            if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != EMPTY)).any()):
                return f"layer {i} holds the same position twice"
            if not bool(torch.isfinite(k).all() and torch.isfinite(v).all()):
                return f"layer {i} holds keys or values that are not finite"
            if layer.surprise is not None and (layer.surprise.shape != pos.shape or not layer.surprise.is_floating_point()):
                return f"layer {i}'s surprise has shape {tuple(layer.surprise.shape)}, not ({B}, {Hkv}, {n})"
        return None


def _stack_layers(rows: list[LayerState]) -> LayerState:
    size = max(r.size for r in rows)
    ref, B = rows[0], sum(r.keys.shape[0] for r in rows)
    _, Hkv, _, hd = ref.keys.shape
    capacity = max(size + 2, *(r.capacity for r in rows))  # room for the next token and a spare slot
    out = LayerState(keys=ref.keys.new_zeros(B, Hkv, capacity, hd), values=ref.values.new_zeros(B, Hkv, capacity, hd),
                     pos=ref.pos.new_full((B, Hkv, capacity), EMPTY), score=ref.score.new_zeros(B, Hkv, capacity),
                     size=size)
    if any(r.surprise is not None for r in rows):  # a row read without surprise: 0 (see LayerState.surprises)
        out.surprises()
    b = 0
    for r in rows:
        rows_here, n = r.keys.shape[0], r.size
        pairs = [(out.keys, r.keys), (out.values, r.values), (out.pos, r.pos), (out.score, r.score)]
        if r.surprise is not None:
            pairs.append((out.surprise, r.surprise))
        for dst, src in pairs:
            dst[b : b + rows_here, :, :n] = src[:, :, :n]  # (rows, Hkv, n, ...) the row's states, slots [0, n)
        b += rows_here
    out.maybe_empty = bool((out.pos[:, :, :size] == EMPTY).any())
    return out
