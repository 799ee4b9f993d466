"""Llama/Mistral written as a multi-state RNN.

    logits, state = model.step(tokens, state, policy)      # one token per row; the state is updated in place

A decoder layer's "hidden state" is the set of (key, value) pairs of every token it has seen: the multi-state. A new
token adds its own pair, attends over all n+1 pairs, and the policy then keeps at most k of them. With no policy the
state grows forever and the recurrence computes exactly the causal transformer; `model(tokens)` is that same function
evaluated for all positions at once and serves as the reference.

Every entry point runs one loop, `_advance`, over T new tokens per row, layer-major: each layer takes all T tokens
before the next one starts. T = 1 is the recurrence (`step`); T > 1 a chunk of a prefill, parallel where no
eviction can happen and otherwise `attention.scan`: the same recurrence, with only attention and eviction stepped
token by token (weights are then read once per chunk, not once per token). What a layer does with its multi-state
(append, attend, evict) is `attention.attend`. Shapes: B batch rows, T new tokens, d hidden size, H query heads,
Hkv kv heads, G = H / Hkv query heads per kv head, hd head dim.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import surprise
from .attention import attend, check_unranked
from .config import Config
from .errors import InputError
from .policies import Policy, check_policy, layer_budgets
from .rope import cos_sin, effective_positions, fused_turn, inv_frequencies, rotate, rotates_at_use, turn
from .state import EMPTY, State


PREFILL_MODES = ("exact", "fast")  # the recurrence itself (layer-major), or one parallel pass + one eviction


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps), computed in fp32 whatever the model's dtype (as transformers does), then scaled
        if x.dtype == torch.float32 == self.weight.dtype:  # the same product, in one kernel
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class Block(nn.Module):
    """One decoder layer: pre-norm attention over the layer's multi-state, then a pre-norm SwiGLU MLP."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        H, Hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qkv = nn.Linear(d, (H + 2 * Hkv) * hd, bias=cfg.attention_bias)  # q_proj | k_proj | v_proj, fused
        self.o = nn.Linear(H * hd, d, bias=cfg.attention_bias)
        self.mlp_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)  # gate_proj | up_proj, fused
        self.down = nn.Linear(cfg.intermediate_size, d, bias=cfg.mlp_bias)
        self.compiled = None  # this layer's forward compiled for one-token calls (Transformer.compile), or None

    def forward(self, x, layer_state, pos, rope, policy: Policy | None, each_token: bool = True):
        """x (B, T, d) -> (B, T, d): T new tokens through this layer; layer_state grows by T, the policy bounds it.

        rope = (inv_freq, cos, sin) of the new tokens' absolute positions pos (B, T); inv_freq is (hd/2,), or
        (T, hd/2) when each token has its own (dynamic scaling, token by token); cos, sin are `rope.fused_turn`'s
        tables for the fused projection. each_token: the policy evicts after every token (the recurrence, run here
        layer-major: see `attention.scan`); False: once, after the whole chunk (fast prefill)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv = self.qkv(self.attn_norm(x)).view(B, T, H + 2 * Hkv, hd)  # (B, T, heads of q | k | v, hd)
        inv_freq, cos, sin = rope  # cos, sin (B, T, H + 2 Hkv, hd): rope.fused_turn's tables (None: rotate at use)
        scheme = policy.positions if policy is not None else "absolute"
        if not rotates_at_use(scheme):  # keys are cached rotated, once, at their (absolute or rebased) position
            qkv = turn(qkv, cos, sin)  # q and k heads rotated, v heads as they were, in one pass
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        q = q.view(B, T, Hkv, H // Hkv, hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hd)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, hd)
        out = attend(q, k, v, layer_state, pos, policy, each_token, scheme, inv_freq, cfg.sliding_window)
        x = x + self.o(out)  # out (B, T, H*hd)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, T, I) each
        return x + self.down(F.silu(gate) * up)


def _layers(blocks, x, layer_states, pos, rope, policies):
    """One token (T = 1) through every layer: what `Transformer.compile` compiles as one graph."""
    for block, layer_state, policy in zip(blocks, layer_states, policies):
        x = Block.forward(block, x, layer_state, pos, rope, policy)
    return x


def static_step(state: State, policies) -> bool:
    """Whether a one-token step can run as one graph of static shapes: every layer bounded and holding exactly its
    k states (attention.ring_step: no host sync, nothing changes size), and no trace. An unbounded layer grows by a
    slot a step: its graphs recompile as its buffers grow, 30 layers at once in one graph (tens of seconds), so an
    unbounded step stays layer by layer."""
    for layer, policy in zip(state.layers, policies):
        if layer.trace is not None or policy is None or policy.states is None:
            return False
        if rotates_at_use(policy.positions) or not layer.holds_exactly(policy):
            return False
    return True


def as_tokens(tokens, device) -> torch.Tensor:
    """`tokens` (a tensor or nested lists of ids) as a tensor on `device`: text, floats or an empty batch are
    refused here, with a message that says what to pass, instead of failing deep inside torch."""
    try:
        t = torch.as_tensor(tokens, device=device)
    except (TypeError, ValueError, RuntimeError) as e:  # ['a'], ragged lists, objects
        raise InputError(f"tokens must be integer token ids (a tensor or lists of ints), got {str(tokens)[:60]}; "
                         "encode text with the tokenizer first (tokenizer.encode(text)).") from e
    if t.is_floating_point() or t.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise InputError(f"tokens must be integer ids, got dtype {t.dtype}.")
    if t.dim() and t.shape[0] == 0:
        raise InputError("tokens is empty (a batch of 0 rows): give at least one row of token ids.")
    return t


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # The table is made empty and initialised here only off the meta device: loading builds the model on "meta"
        # and assigns the weights, and on torch 2.13 a random init on meta imports torch._dynamo (1.2 s of load time)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if not self.embed.weight.is_meta:
            nn.init.normal_(self.embed.weight)  # what nn.Embedding itself does
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.identity = ""  # where the weights came from (checked when a saved state is loaded)
        self.compiled_layers = None  # the whole one-token step compiled (compile()), or None: eager

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_state(self, batch_size: int = 1, policy: Policy | None = None) -> State:
        """An empty multi-state for `batch_size` rows, with room for the policy's budget + the incoming token."""
        cfg = self.cfg
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        check_policy(policy)
        states = getattr(policy, "states", None)
        capacity = self._capacities(policy)
        meta = {"model": self.identity, "policy": getattr(policy, "name", "full"), "states": states}
        rope_at_use = rotates_at_use(getattr(policy, "positions", "absolute"))
        return State.empty(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, capacity,
                           self.dtype, rope_at_use=rope_at_use, meta=meta, device=self.embed.weight.device)

    def compile(self, backend: str = "inductor", whole_step: bool = True, **options) -> "Transformer":
        """Compile the one-token step with torch.compile (`msrnn bench/generate --compile`).

        Two compiled functions: the whole step (`_layers`: every layer in one graph, one dynamo guard check per
        token instead of one per layer call: 60-190 us each, 30 layers) once every layer holds exactly its k states
        (`attention.ring_step`: static shapes, no host sync; `static_step`); and each layer's call alone
        (`Block.forward`; the layers share its graphs) for an unbounded state, which grows a slot a step, and while
        a bounded layer still fills up, where `compact` reads sizes on the host (graph breaks, by design). The whole
        step is a graph 30 layers long: its first call compiles for tens of seconds more (once per policy and batch
        size; `whole_step=False` leaves it out). A decode step is ~75 small operations per layer, each a few
        microseconds of dispatch and, with several threads, a fork-join: compiled, they fuse into a few kernels
        around the weight products. Chunks (T > 1) stay eager: their matrix products dominate. The first steps compile (a minute with inductor, which
        needs a C++ compiler; `compile_cache` keeps the result on disk for the next process); results equal the
        eager model's up to float rounding. Returns the model."""
        import functools
        import logging
        import os
        import shutil

        import torch._dynamo

        from .compile_cache import use_cache

        cpu = self.embed.weight.device.type == "cpu"
        if backend == "inductor" and cpu and not any(map(shutil.which, (os.environ.get("CXX", "g++"), "g++", "clang++"))):
            raise InputError("compiling for the CPU with torch's inductor needs a C++ compiler, and none was found "
                             "(g++, clang++ or $CXX); install one (e.g. apt install g++) or run without --compile.")
        if backend == "inductor":
            use_cache()  # inductor's and AOTAutograd's on-disk caches under msrnn's cache folder
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # policies x shapes
        # Until a layer holds its k states, a step sizes the state on the host (graph breaks, by design): keep
        # dynamo's warnings about them out of the user's output (errors still show)
        torch._logging.set_logs(dynamo=logging.ERROR)
        try:
            step = torch.compile(Block.forward, backend=backend, **options)
            self.compiled_layers = torch.compile(_layers, backend=backend, **options) if whole_step else None
        except Exception as e:  # an unknown backend or option: torch's own message, under ours
            raise InputError(f"torch.compile refused backend={backend!r} {options or ''}: {e}") from e
        for block in self.layers:
            block.compiled = functools.partial(step, block)
        return self

    def _capacities(self, policy: Policy | None) -> list[int]:
        """Slots per layer: k + the incoming token + a spare slot (per layer: PyramidKV's budgets differ); a budget
        beyond the trained context starts there and grows as needed."""
        return [min(k, self.cfg.max_position_embeddings) + 2 if k is not None else 64
                for k in layer_budgets(policy, self.cfg.num_hidden_layers)]

    # --- the one loop -------------------------------------------------------------------------------------------
    def _advance(self, tokens: torch.Tensor, state: State, policy: Policy | None, each_token: bool = True):
        """Feed T new tokens per row through every layer, updating `state`; returns final hidden (B, T, d).

        Layer-major: each layer takes all T tokens before the next layer starts (see `scan` for why a bounded
        policy still evicts after every token). each_token=False evicts once per layer, after the T tokens."""
        self._check(tokens, state, policy)
        scheme = getattr(policy, "positions", "absolute")
        if "rebase" not in ((scheme,) if isinstance(scheme, str) else scheme):
            return self._through_layers(tokens, state, policy, each_token)
        hidden = []
        while tokens.shape[1]:  # a rebase row renumbers where it reaches the trained context, inside these tokens too
            split = self._rebase(state, scheme, tokens.shape[1]) or tokens.shape[1]
            hidden.append(self._through_layers(tokens[:, :split], state, policy, each_token))
            tokens = tokens[:, split:]
        return torch.cat(hidden, dim=1)

    def _through_layers(self, tokens: torch.Tensor, state: State, policy: Policy | None, each_token: bool):
        """_advance's T tokens through every layer, layer-major (no rebase inside them)."""
        B, T = tokens.shape
        pos = state.next_pos[:, None] + torch.arange(T, device=tokens.device)  # (B, T) absolute positions
        cfg = self.cfg
        if policy is not None and policy.states is not None and each_token:
            seq_len = pos.amax(dim=0) + 1  # (T,) token by token, as the recurrence would rotate each one
        else:
            seq_len = int(pos.max()) + 1  # dynamic RoPE scales by the length of the forward call (transformers)
        inv_freq = inv_frequencies(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, seq_len)  # (hd/2,) | (T, hd/2)
        inv_freq = inv_freq.to(tokens.device)
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        cos = sin = None  # a scheme that rotates at use turns the keys it holds in attention instead
        if not rotates_at_use(getattr(policy, "positions", "absolute")):
            cos, sin = fused_turn(*cos_sin(pos, inv_freq, self.dtype), H + Hkv, H + 2 * Hkv)  # (B, T, H + 2 Hkv, hd)
        x = self.embed(tokens)  # (B, T, d)
        layers = len(self.layers)
        policies = [policy.at_layer(i, layers) if policy is not None else None for i in range(layers)]  # PyramidKV
        rope = (inv_freq, cos, sin)
        if T == 1 and each_token and self.compiled_layers is not None and static_step(state, policies):
            x = self.compiled_layers(self.layers, x, state.layers, pos, rope, policies)  # one graph (see compile())
        else:
            for block, layer_state, layer_policy in zip(self.layers, state.layers, policies):
                run = block.compiled if T == 1 and block.compiled is not None else block  # see compile()
                x = run(x, layer_state, pos, rope, layer_policy, each_token)
        state.next_pos = state.next_pos + T
        check_unranked(state.layers, lambda i: policy.at_layer(i, layers))  # NaN priorities: one sync a step
        return self.norm(x)

    def _rebase(self, state: State, scheme, T: int) -> int:
        """The `rebase` position scheme: when a row of that scheme reaches the trained context (its next position
        is max_position_embeddings), renumber the states each layer holds 0, 1, ..., n-1 in position order (what
        `shift` does at every step) and continue the row's stream from the largest n. Cached keys are turned by
        the difference, R(new - old) R(old) k = R(new) k, so between two rebases a row runs exactly as with
        absolute positions, at the cost of one rotation of the state every few thousand tokens, and no query
        ever meets a key further back than the trained context (unless the budget itself is that large).
        Positions are rewritten: whatever reads them later (policies, the retention trace) sees the new ones.
        Rows at the limit are renumbered now; returns how many of the T new tokens to feed before a row reaches
        it (again), 0 if none does, so that the caller splits there: where a rebase happens never depends on how
        the stream was cut into calls. (A budget that fills the trained context by itself renumbers before every
        token, as stepping does.)"""
        per_row = [scheme] * state.batch_size if isinstance(scheme, str) else list(scheme)
        limit = self.cfg.max_position_embeddings
        rebasing = torch.tensor([s == "rebase" for s in per_row], device=state.next_pos.device)  # (B,)

        def split() -> int:  # the fewest tokens a rebase row may take before its next rebase, if fewer than T
            ahead = (limit - state.next_pos[rebasing]).clamp(min=1)  # (R,) 1: renumbered, it is at the limit still
            inside = ahead[ahead < T]
            return int(inside.min()) if len(inside) else 0

        rows = rebasing & (state.next_pos >= limit)  # (B,) rows at the trained context
        if not bool(rows.any()):
            return split()
        inv_freq = inv_frequencies(self.cfg.rope, self.cfg.head_dim, limit).to(state.next_pos.device)  # unscaled
        top = torch.full_like(state.next_pos[rows], -1)  # (R,) the largest new position in any layer
        for layer in state.layers:
            n = layer.size
            if n == 0:  # nothing held (the baseline has just dropped everything): nothing to renumber
                continue
            old = layer.pos[rows, :, :n]  # (R, Hkv, n)
            held = old != EMPTY
            new = effective_positions(old, "shift").long().masked_fill(~held, EMPTY)  # (R, Hkv, n) ranks 0..
            if not state.rope_at_use:  # keys were rotated at `old`: turn them on to `new`
                c, s = cos_sin((new - old).masked_fill(~held, 0), inv_freq, layer.keys.dtype)  # (R, Hkv, n, hd)
                layer.keys[rows, :, :n] = rotate(layer.keys[rows, :, :n], c, s)
            layer.pos[rows, :, :n] = new
            top = torch.maximum(top, new.flatten(1).amax(dim=1))
        state.next_pos[rows] = top + 1
        return split()  # renumbered, a row may reach the limit again inside these T tokens (a small limit)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied: the embedding matrix (int weights keep an int copy in lm_head instead)
            return F.linear(h, self.embed.weight).float()  # (..., vocab)
        return self.lm_head(h).float()

    # --- public API ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference: the ordinary causal transformer over tokens (B, T) -> logits (B, T, vocab), fp32."""
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        state = self.init_state(tokens.shape[0])
        return self._logits(self._advance(tokens, state, None))

    @torch.inference_mode()
    def step(self, tokens, state: State | None = None, policy: Policy | None = None):
        """One step of the recurrence: tokens (B,) -> (logits (B, vocab) fp32, state).

        The state is updated in place and returned (fork() it first to keep the old one). None starts a new one.
        """
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        if tokens.dim() != 1:
            raise InputError(f"step takes one token per batch row, shape (B,); got shape {tuple(tokens.shape)}. "
                             "Use prefill() for a prompt.")
        if state is None:
            state = self.init_state(tokens.shape[0], policy)
        reads = surprise.check(policy, "exact")  # (span, recent) of a policy that ranks states by how they surprised
        h = self._advance(tokens[:, None], state, policy)  # (B, 1, d)
        logits = self._logits(h[:, 0])  # (B, vocab)
        if reads is not None:
            surprise.record(state, tokens[:, None], h, self._logits, reads[0], last=logits)
        return logits, state

    @torch.inference_mode()
    def prefill(self, tokens, state: State | None = None, policy: Policy | None = None, mode: str = "exact",
                all_logits: bool = False, chunk: int = 256, progress=None):
        """Consume a prompt tokens (B, T). Returns (logits, state): logits of the last token (B, vocab), or of every
        token (B, T, vocab) with all_logits=True.

        mode="exact": the prompt is run as the recurrence, with eviction after every token (the paper's Algorithm
        1), `chunk` tokens at a time layer-major (see `scan`): the same arithmetic as stepping each token, with each
        layer's weights read once per chunk. A policy that is not layer_local is stepped token by token.
        mode="fast": one parallel call over the whole prompt, then a single eviction down to k by the last query's
        attention (what the official TOVA code and kvpress do). Identical to "exact" when nothing is evicted.
        progress: called with the number of tokens after each chunk (a progress bar's update).
        """
        tokens = as_tokens(tokens, self.embed.weight.device)  # on the model's device
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise InputError(f"prefill takes a prompt of shape (B, T) with T >= 1; got shape {tuple(tokens.shape)}.")
        if mode not in PREFILL_MODES:
            raise InputError(f"prefill mode {mode!r} is unknown; choose 'exact' or 'fast'.")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise InputError(f"chunk={chunk!r}: give a positive number of tokens per layer-major chunk.")
        if state is None:
            state = self.init_state(tokens.shape[0], policy)
        bounded = getattr(policy, "states", None) is not None
        reads = surprise.check(policy, mode) if bounded else None  # (span, recent) of a policy that reads surprise
        if mode == "fast" or not bounded:
            chunk = tokens.shape[1]  # nothing is evicted inside the call: one parallel pass
        elif not policy.layer_local:
            chunk = 1  # the policy looks beyond its layer: token-major, the plain recurrence
        elif reads is not None:
            chunk = min(chunk, reads[1])  # a state's surprise is known after its chunk: while it is in `recent`
        hidden = []
        for piece in tokens.split(chunk, dim=1):
            hidden.append(self._advance(piece, state, policy, each_token=mode == "exact"))
            if reads is not None:
                surprise.record(state, piece, hidden[-1], self._logits, reads[0])
            if progress is not None:
                progress(piece.shape[1])
        if bounded:  # the chunks grew each layer by up to `chunk` slots: decoding needs only k + 2
            for layer, capacity in zip(state.layers, self._capacities(policy)):
                layer.shrink(capacity)
        if all_logits:
            return self._logits(torch.cat(hidden, dim=1)), state
        return self._logits(hidden[-1][:, -1]), state

    def _check(self, tokens: torch.Tensor, state: State, policy: Policy | None) -> None:
        if not isinstance(state, State):
            raise InputError(f"state must be a msrnn State (from model.init_state(batch_size, policy), or None to "
                             f"start one), got {type(state).__name__}.")
        check_policy(policy)
        if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}.")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)][0].item()
            raise InputError(f"token id {bad} is out of range for a vocabulary of {self.cfg.vocab_size} "
                             f"(valid ids: 0..{self.cfg.vocab_size - 1}); was the text encoded with this model's tokenizer?")
        if tokens.shape[0] != state.batch_size:
            raise InputError(f"{tokens.shape[0]} token rows for a state of batch size {state.batch_size}; "
                             f"make the state with model.init_state({tokens.shape[0]}).")
        if len(state.layers) != self.cfg.num_hidden_layers or state.layers[0].keys.shape[1:] != (
            self.cfg.num_key_value_heads, state.layers[0].capacity, self.cfg.head_dim
        ):
            raise InputError("this state was made by a model of another shape; make it with this model's init_state().")
        made_by = state.meta.get("model")
        if made_by and self.identity and made_by != self.identity:
            raise InputError(f"this state was made by the model {made_by!r}, not by this one ({self.identity!r}); "
                             "continue a state with the model that made it, or start a new one with model.init_state().")
        if state.layers[0].keys.dtype != self.dtype:
            raise InputError(f"this state holds {state.layers[0].keys.dtype} keys and values but the model runs in "
                             f"{self.dtype}; load the model with the dtype the state was made with (dtype=...).")
        if state.rope_at_use != rotates_at_use(getattr(policy, "positions", "absolute")):
            raise InputError("this state caches keys for another position scheme than the policy's; make the state "
                             "with model.init_state(batch_size, policy) for the policy you step with.")
        if policy is not None and policy.states is not None:
            self._check_head_budgets(policy)

    def _check_head_budgets(self, policy: Policy) -> None:
        """Budgets per kv head (Policy.per_head) must name each of this model's kv heads once."""
        layers, Hkv = self.cfg.num_hidden_layers, self.cfg.num_key_value_heads
        for i in range(layers):
            bound = policy.at_layer(i, layers)
            for heads in [m.heads for m in getattr(bound, "members", ())] + [bound.heads]:  # RowPolicies: its members
                if heads is None or len(heads) == Hkv:
                    continue
                raise InputError(f"policy {policy.name!r}: layer {i} has {len(heads)} budgets per kv head, but this "
                                 f"model has {Hkv} kv heads per layer; give {Hkv} budgets for each layer.")
