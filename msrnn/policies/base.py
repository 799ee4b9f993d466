"""The policy contract: what turns the unbounded multi-state into a bounded one (the base class, the checks of a
policy's answer, the helpers every family uses, PerLayer and PerHead: a budget per layer, per kv head).

After the new token has attended to all n+1 states of a layer, the model asks the layer's policy which states to keep
when there are more than `states` (k) of them. A policy answers with a *priority* per state: the model keeps the k
states of highest priority (of equal priorities the oldest goes first) and drops every state whose priority is -inf.
Constant +inf marks a state that must stay (attention sinks, a recent window).

What a policy sees (plain tensors; no model needed in a unit test):
    attn   (B, H, n)    fp32 attention probabilities of the newest query, per query head (sums to 1 over n)
    pos    (B, Hkv, n)  int64 absolute position of each state (-1 = empty slot), per kv head
    score  (B, Hkv, n)  fp32 the running score this policy keeps in the state (see `update`)
and returns priority (B, 1, n) for a layer-wise decision or (B, Hkv, n) for one per kv head. Query head h reads kv
head h // G with G = H / Hkv, so `attn.view(B, Hkv, G, n)` groups a kv head's query heads.

A policy that keeps a running score (H2O) overrides `update(score, attn)`, called once per forward call with the
probabilities of all T new queries, attn (B, H, T, n); T is 1 in the recurrence and larger only in a parallel prefill.

A policy that sets `needs_values = True` is also given the states' values, `priority(attn, pos, score, values=...)`
with values (B, Hkv, n, hd) (a view of the state: read, never write); one that sets `needs_value_norms = True` is
given value_norms=(B, Hkv, n), the L1 norm of each state's value per kv head, which the state computes once when a
state enters instead of at every step (tova-value). One that sets `needs_queries = True` is given queries=(B, H, hd),
the newest token's query per query head, rotated at its position as attention used it, and inv_freq=(hd/2,), the
layer's RoPE frequencies at that step, to turn it to other positions (ExpectedAttention); position schemes that
rotate keys at use (shift, loglog) are refused for such a policy. One that sets `needs_surprise = True` is given
surprise=(B, Hkv, n): the largest surprisal -log p(x_q | x_<q) of the model's own among the `span` tokens q up to
each state's (msrnn/surprise.py), +inf while unknown; it must keep its newest `recent` states whatever their
surprise, as prefill feeds at most `recent` tokens per chunk and a state's surprise is known after its chunk.
Every other policy is called with the three
arguments above, so a policy written for them keeps working.
"""
from __future__ import annotations

import torch

from ..errors import InputError

INF = float("inf")
POSITION_SCHEMES = ("absolute", "shift", "loglog", "rebase")  # see msrnn/rope.py


class Policy:
    """Base class. Subclasses set `name` and implement `priority` (and `update` if they keep a score)."""

    name = "policy"
    needs_attention = True  # False: priority ignores `attn` (window, sinks...); it is then given None
    layer_local = True  # decides from its own layer's tensors only, so a chunk can run layer-major (attention.scan)
    min_states = 1  # the smallest budget that makes sense for this policy
    keeps_score = False  # set for every class that overrides `update`
    drops = True  # priority may be -inf ("drop now"); False lets the model skip that check (built-ins that never do)
    needs_values = False  # True: priority is also given values=(B, Hkv, n, hd), the states' values
    needs_value_norms = False  # True: priority is also given value_norms=(B, Hkv, n), |v_j|_1 per kv head
    needs_keys = False  # True: priority also takes keys=(B, Hkv, n, hd), the keys the layer holds (KeyDiff)
    needs_queries = False  # True: priority also takes queries=(B, H, hd) (the newest, rotated) and inv_freq=(hd/2,)
    needs_surprise = False  # True: priority also takes surprise=(B, Hkv, n); the policy sets `span` and `recent`
    heads = None  # (k_0, ..., k_{Hkv-1}): a budget per kv head (PerHead), or None: `states` for every head

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.keeps_score = cls.update is not Policy.update

    def __init__(self, states: int, positions: str = "absolute"):
        if isinstance(states, bool) or not isinstance(states, int) or states < self.min_states:
            raise InputError(f"{self.name}: states={states!r} is not a valid budget; give an integer >= {self.min_states}.")
        if positions not in POSITION_SCHEMES:
            raise InputError(f"positions={positions!r} is unknown; choose one of {', '.join(POSITION_SCHEMES)}.")
        self.states = states  # k: the most states a layer keeps after each step
        self.positions = positions

    def per_head(self, budgets) -> "PerHead":
        """This policy with a budget per kv head, budgets = (k_0, ..., k_{Hkv-1}) (see PerHead)."""
        return PerHead(self, budgets)

    def budget(self):
        """k, the most states a row may keep: an int, (B, 1, 1) when rows have budgets of their own, or
        (1, Hkv, 1) when kv heads do (`heads`: PerHead, retrieval)."""
        return self.states if self.heads is None else torch.tensor(self.heads)[None, :, None]

    def min_budget(self) -> int:
        """The smallest budget of any row or kv head: a layer holding no more cannot have to evict."""
        return self.states if self.heads is None else min(self.heads)

    def at_layer(self, layer: int, layers: int) -> "Policy":
        """The policy that bounds layer `layer` (0 = the one next to the embeddings) of a model of `layers` layers.
        One budget for every layer: the policy itself. A per-layer policy (`PerLayer`, `PyramidKV`) answers with a
        policy of that layer's budget; the model binds each layer once per call, so nothing else sees a list."""
        return self

    def update(self, score: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return score

    def priority(self, attn: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(states={self.states})"


def check_priority(policy: Policy, prio, pos: torch.Tensor, nan: bool = False):
    """prio as `policy` returned it, if it has the contract's shape (B, 1 or Hkv, n) and a float dtype (and, with
    nan=True, no NaN); otherwise one InputError that names the policy."""
    _contract_shape(policy, prio, pos, "priority", "a priority is")
    if nan and bool(prio.isnan().any()):
        raise nan_error(policy, int(prio.isnan().flatten(1).any(1).nonzero()[0]))
    return prio


def check_score(policy: Policy, new, score: torch.Tensor):
    """new, as `policy.update` returned it, if it has the contract's shape (B, 1 or Hkv, n) for a score (B, Hkv, n)
    and a float dtype (a tensor of another shape would broadcast into the state's scores unnoticed); otherwise one
    InputError that names the policy. Shapes and dtypes only: no host sync."""
    return _contract_shape(policy, new, score, "update", "a score is", ", as the score it is given")


def _contract_shape(policy: Policy, got, like: torch.Tensor, method: str, what: str, note: str = ""):
    """got, if it is a float tensor of shape (B, 1 or Hkv, n) for like (B, Hkv, n); else the InputError naming
    policy.method."""
    B, Hkv, n = like.shape
    if not isinstance(got, torch.Tensor) or not got.is_floating_point() or got.dim() != 3 or \
            got.shape[0] != B or got.shape[1] not in (1, Hkv) or got.shape[2] != n:
        shape = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise InputError(f"policy {policy.name!r} ({type(policy).__name__}.{method}) returned {shape}; {what} a "
                         f"float tensor of shape (B, 1, n) or (B, Hkv, n){note}, here ({B}, 1 or {Hkv}, {n}) "
                         "(docs/policies.md).")
    return got


def check_policy(policy) -> None:
    """A policy the model can bind: None (unbounded) or a Policy whose __init__ ran Policy.__init__ (which sets its
    budget and position scheme); one InputError otherwise."""
    if policy is None:
        return
    if not isinstance(policy, Policy):
        raise InputError(f"policy must be a msrnn.policies.Policy (or None for unbounded), got "
                         f"{type(policy).__name__}; build one with msrnn.policies.make_policy(name, states).")
    if not hasattr(policy, "states") or not hasattr(policy, "positions"):
        cls = type(policy).__name__
        raise InputError(f"{cls}.__init__ did not call super().__init__(states, positions), so the policy has no "
                         f"budget; call it first in {cls}.__init__ (docs/policies.md).")


def nan_error(policy: Policy, row: int) -> InputError:
    """The error for NaN priorities in batch row `row` (a NaN cannot be ranked), naming the policy of that row."""
    for member, first, end in getattr(policy, "blocks", ()):  # rows of several policies: name the culprit
        if first <= row < end:
            policy = member
    return InputError(f"policy {policy.name!r} ({type(policy).__name__}.priority) returned NaN priorities; "
                      "a NaN cannot be ranked (look for 0/0 or log(0) in the policy).")


# What the model asks of a policy, and how a policy made of several (PerLayer: one per layer; RowPolicies: one per
# block of rows) answers for its members: it needs something if any member does, is layer-local if all are.
CONTRACT_FLAGS = (("needs_attention", any), ("keeps_score", any), ("drops", any), ("needs_keys", any),
                  ("needs_values", any), ("needs_value_norms", any), ("needs_queries", any), ("needs_surprise", any),
                  ("layer_local", all))


def take_flags(policy: Policy, members) -> None:
    """Set policy's contract flags (CONTRACT_FLAGS) from its members'."""
    for flag, combine in CONTRACT_FLAGS:
        setattr(policy, flag, combine(getattr(m, flag) for m in members))


class PerHead(Policy):
    """One layer's policy with a budget per kv head: kv head h keeps its own k_h states (`heads`).

        make_policy("tova", [[512, 64, 64], [64, 64, 512]])     # 2 layers of 3 kv heads: a PerLayer of PerHeads

    A kv head with a budget of its own decides on its own: the policy sees each kv head as a batch row of its own
    (attn (B, H, n) -> (B*Hkv, G, n): its G query heads; pos, score -> (B*Hkv, 1, n)), so a layer-wide policy such
    as TOVA (one decision for all heads, the head-mean of attention) ranks each head's states by that head's own
    group of queries, as tova-head does (queries (B, H, hd) -> (B*Hkv, G, hd) alike). Head-wise policies
    (tova-head, h2o...) decide exactly as without it.
    `states` is the largest k_h (the slots the layer needs); settings derived from k when the policy was made
    (H2O's recent half, SnapKV's window) keep that value (make_policy makes it with the smallest k_h)."""

    def __init__(self, policy: Policy, budgets):
        budgets = tuple(budgets)
        if not isinstance(policy, Policy) or isinstance(policy, PerHead) or type(policy).at_layer is not Policy.at_layer:
            raise InputError("PerHead takes one layer's policy (not a policy with budgets per layer or per head).")
        if not budgets or any(isinstance(k, bool) or not isinstance(k, int) or k < policy.min_states for k in budgets):
            raise InputError(f"{policy.name}: per-head budgets {list(budgets)} must be whole numbers >= "
                             f"{policy.min_states}, one per kv head.")
        self.inner, self.heads, self.states = policy, budgets, max(budgets)
        self.name, self.positions, self.min_states = policy.name, policy.positions, policy.min_states
        take_flags(self, [policy])
    def update(self, score, attn):
        B, Hkv, n = score.shape  # attn (B, H, T, n) -> (B*Hkv, G, T, n): each kv head a row of its own
        return self.inner.update(score.reshape(B * Hkv, 1, n), attn.reshape(B * Hkv, -1, *attn.shape[2:])).view(B, Hkv, n)

    def priority(self, attn, pos, score, **extra):
        B, Hkv, n = pos.shape
        # keys, values, value_norms (B, Hkv, ...) -> (B*Hkv, 1, ...); queries (B, H, hd) -> (B*Hkv, G, hd);
        # inv_freq (hd/2,) is the layer's, the same for every row
        rows = {k: v if k == "inv_freq" else v.reshape(B * Hkv, -1, *v.shape[2:]) for k, v in extra.items()}
        prio = self.inner.priority(None if attn is None else attn.reshape(B * Hkv, -1, n),
                                   pos.reshape(B * Hkv, 1, n), score.reshape(B * Hkv, 1, n), **rows)
        return check_priority(self.inner, prio, pos.reshape(B * Hkv, 1, n)).view(B, Hkv, n)

    def __repr__(self) -> str:
        return f"PerHead({self.inner!r}, heads={list(self.heads)})"


def per_kv_head(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, ...) -> (B, Hkv, G, ...): each kv head's group of query heads."""
    return attn.view(attn.shape[0], kv_heads, -1, *attn.shape[2:])


def newest(pos: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, 1) the position of the newest state of each row (it is always present when the policy runs)."""
    return pos.amax(dim=-1, keepdim=True)


def whole(name: str, key: str, value) -> int:
    """A policy setting that counts tokens: 2.5 sinks is a mistake, not 2."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name}: {key}={value!r} must be a whole number of tokens.")
    return value


class PerLayer(Policy):
    """One policy per layer, each with its own budget: `states` is the list [k_0, k_1, ...], layer 0 first.

        make_policy("tova", [96, 64, 32])      # a 3-layer model: layer 0 keeps 96 states, layer 2 keeps 32

    The model asks `at_layer(i, layers)` for layer i's policy (members[i]) before the layer runs, so attention,
    eviction and the state's buffers only ever see one integer budget; a list of another length than the model's
    layers is refused there, with one error."""

    name = "per-layer"

    def __init__(self, members):
        members = list(members)
        if not members or not all(isinstance(m, Policy) and not isinstance(m, PerLayer) for m in members):
            raise InputError("PerLayer takes a non-empty list of policies, one per layer (layer 0 first).")
        for m in members:
            check_policy(m)
        if len({m.positions for m in members}) != 1:
            raise InputError("PerLayer: every layer's policy needs the same position scheme.")
        self.members, self.positions = members, members[0].positions
        # the budgets, layer 0 first, a list per kv head where heads have their own (a label: the model binds members)
        self.states = [list(m.heads) if m.heads is not None else m.states for m in members]
        self.name = members[0].name if len({m.name for m in members}) == 1 else "per-layer"
        take_flags(self, members)
        self.min_states = min(m.min_states for m in members)

    def at_layer(self, layer, layers):
        if layers != len(self.members):
            raise InputError(f"policy {self.name!r}: {len(self.members)} per-layer budgets for a model of {layers} "
                             f"layers; give exactly {layers} budgets, one per layer (layer 0 first), e.g. "
                             f"--states \"[{','.join(['256'] * min(layers, 3))}{',...' if layers > 3 else ''}]\".")
        return self.members[layer]

    def budget(self):
        raise InputError("a PerLayer policy has one budget per layer; bind a layer with at_layer(layer, layers).")

    def min_budget(self) -> int:
        return min(m.min_budget() for m in self.members)

    def priority(self, attn, pos, score, keys=None):
        raise InputError("a PerLayer policy decides per layer; bind a layer with at_layer(layer, layers).")

    def __repr__(self) -> str:
        return f"PerLayer({self.members!r})"


def layer_budgets(policy: Policy | None, layers: int) -> list[int | None]:
    """The budget of each of the `layers` layers under `policy` (None: unbounded)."""
    if policy is None:
        return [None] * layers
    return [policy.at_layer(i, layers).states for i in range(layers)]


def built_in(policy: Policy) -> bool:
    """Is `policy` of a class msrnn defines (a module of msrnn/policies/), not a user's?"""
    return type(policy).__module__.startswith(f"{__package__}.")
