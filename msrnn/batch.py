"""Rows of different policies in one batch: one `model.prefill` or `step` advances all of them.

    rows = RowPolicies([make_policy("tova", 64), make_policy("h2o", 128)], rows=2)   # 4 batch rows
    state = model.init_state(4, rows)                                              # rows 0-1: TOVA 64, rows 2-3: H2O 128

msrnn eval runs the paper's whole grid (policies x budgets x chunks) as one batch this way: a step costs far less
than one step per cell, because the weights are read once for every row.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import InputError
from .policies import Policy, built_in, check_policy, check_priority, check_score, take_flags
from .rope import rotates_at_use


class RowPolicies(Policy):
    """Several policies, each with its own budget, each owning a block of `rows` consecutive batch rows, so that one
    `model.step` advances all of them (rows member-major: member i owns rows [i*rows, (i+1)*rows)).

    Members may use different position schemes: `positions` is then a tuple of one scheme per row, and if any
    rotates keys at use (shift, loglog) every row does (an absolute row is given its own positions back).

    The model asks a policy for one priority per row and kv head; this one asks each member about its own rows and
    stacks the answers. `budget()` gives each row its own k; the model asks for priorities as soon as any row may
    have to evict (`min_budget()`), and a row under its budget keeps everything."""

    name = "rows"

    def __init__(self, members: Sequence[Policy], rows: int, bound: bool = False):
        """bound: the members are already one layer's policies (made by at_layer: bound once, as the model does)."""
        for m in members:
            check_policy(m)
        schemes = {m.positions for m in members}
        positions = members[0].positions if len(schemes) == 1 else tuple(m.positions for m in members for _ in range(rows))
        self.members, self.rows = list(members), rows
        take_flags(self, members)
        if self.needs_queries and rotates_at_use(positions):  # every row would cache un-rotated keys and queries
            raise InputError("a policy that reads the newest query (expected-attention) cannot share a batch with "
                             "rows whose positions rotate keys at use (shift, loglog); run them in separate batches.")
        self._layers = {}  # (layer, layers) -> the RowPolicies of the members' policies for that layer
        if not bound and any(type(m).at_layer is not Policy.at_layer for m in members):  # budgets per layer:
            self.states, self.positions = [m.states for m in members], positions  # bound by at_layer
            return
        super().__init__(min(m.min_budget() for m in members), members[0].positions)
        self.positions = positions  # one scheme per row if they differ (msrnn.rope.effective_positions)
        # one budget: the model's plain eviction path applies
        self.uniform = len({m.states for m in members}) == 1 and all(m.heads is None for m in members)
        per_head = [m.heads for m in members if m.heads is not None]  # budgets per kv head: (R, Hkv, 1)
        heads = len(per_head[0]) if per_head else 1
        self._budget = torch.tensor([list(m.heads) if m.heads is not None else [m.states] * heads
                                     for m in members]).repeat_interleave(rows, dim=0)[:, :, None]  # (R, 1 or Hkv, 1)
        if per_head:
            self.states = max(m.states for m in members)  # the slots a layer needs
        self.blocks = []  # [policy, first row, end row]: neighbours that decide alike share one call
        for i, member in enumerate(self.members):
            if self.blocks and _alike(self.blocks[-1][0], member):
                self.blocks[-1][2] = (i + 1) * rows
            else:
                self.blocks.append([member, i * rows, (i + 1) * rows])

    def at_layer(self, layer, layers):
        if not hasattr(self, "_budget"):  # a member has budgets per layer: its rows get this layer's
            if (layer, layers) not in self._layers:
                self._layers[layer, layers] = RowPolicies([m.at_layer(layer, layers) for m in self.members], self.rows,
                                                          bound=True)
            return self._layers[layer, layers]
        return self

    def budget(self) -> torch.Tensor:
        """(R, 1, 1) each row's budget, (R, Hkv, 1) if a member has budgets per kv head (the int k when every
        member has the same)."""
        return self.states if self.uniform else self._budget

    def min_budget(self) -> int:
        return min(m.min_budget() for m in self.members)

    def update(self, score, attn):
        out = score.clone()  # (R, Hkv, n)
        for m, a, b in self.blocks:
            if m.keeps_score:
                out[a:b] = check_score(m, m.update(score[a:b], attn[a:b]), score[a:b])  # no broadcast into a block
        return out

    def priority(self, attn, pos, score, keys=None, values=None, value_norms=None, queries=None, inv_freq=None,
                 surprise=None):
        return torch.cat([check_priority(m, m.priority(None if attn is None else attn[a:b], pos[a:b], score[a:b],
                                                       **({"keys": keys[a:b]} if m.needs_keys else {}),
                                                       **({"queries": queries[a:b], "inv_freq": inv_freq}
                                                          if m.needs_queries else {}),
                                                       **({"values": values[a:b]} if m.needs_values else {}),
                                                       **({"value_norms": value_norms[a:b]}
                                                          if m.needs_value_norms else {}),
                                                       **({"surprise": surprise[a:b]} if m.needs_surprise else {})),
                                         pos[a:b]).expand(pos[a:b].shape) for m, a, b in self.blocks])  # (R, Hkv, n)

    def __repr__(self) -> str:
        return f"RowPolicies({self.members!r}, rows={self.rows})"


def _alike(a: Policy, b: Policy) -> bool:
    """Built-in policies of one class whose settings differ only in the budget decide alike (no built-in priority
    or update reads `states`), so one call can serve the rows of both."""
    if type(a) is not type(b) or not built_in(a):
        return False
    va, vb = ({k: v for k, v in vars(p).items() if k != "states"} for p in (a, b))
    return va.keys() == vb.keys() and all(
        torch.equal(va[k], vb[k]) if isinstance(va[k], torch.Tensor) else va[k] == vb[k] for k in va)
