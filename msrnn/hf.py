"""msrnn policies inside Hugging Face transformers: prototype a policy here, run it on any served model.

    import msrnn.hf                                   # registers the attention implementation "msrnn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="msrnn", device_map="auto")
    cache = msrnn.hf.PolicyCache(msrnn.policies.TOVA(states=256))
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=100)

`PolicyCache` is a transformers `Cache` whose layers each hold a msrnn `LayerState` (msrnn/state.py): at most k
states per layer, evicted by any msrnn `Policy` in the order of msrnn's own recurrence. It works for any causal LM
whose attention calls `cache.update(keys, values, layer_idx)` and then the attention function the config names
(Llama, Mistral, Qwen2, Phi-3, ...: transformers' standard attention), on CPU or CUDA, sharded with a device map.

How it fits into transformers without patching it. A transformers attention layer does, per forward call:

    keys, values = cache.update(keys, values, layer_idx)            # (1) PolicyLayer.update
    out = ATTENTION_FUNCTIONS[config._attn_implementation](...)    # (2) policy_attention

A cache only sees keys and values, but TOVA and H2O need the newest query's attention, and an eviction must happen
*between* the tokens of a prompt to be the recurrence. So (1) only hands the new keys, values and positions over,
and (2), an attention implementation registered under the name "msrnn" through transformers' `AttentionInterface`
(its extension point for attention kernels), runs the layer's attention and eviction with the very function msrnn's
own model runs (`msrnn.attention.attend`). A policy therefore behaves identically here and in msrnn: the tests check the
logits against msrnn's recurrence to 1e-5. A mask function registered under the same name
(`AttentionMaskInterface`) gives (2) the padding of the new tokens; visibility is otherwise decided from the
positions the states carry (slots are in no order after evictions, so transformers' index-based mask cannot apply).

Speed. Policies that read attention (`needs_attention` or a running score: TOVA, H2O...) get the probabilities
computed explicitly, as eager attention does. Policies that do not (window, sinks, baseline, or None) never
materialise them: their attention runs in torch's fused `scaled_dot_product_attention`. A prompt that overflows the
budget is evicted token by token (prefill="exact", the paper's recurrence, layer-major as in msrnn) or once after the
whole prompt (prefill="fast", kvpress's and the official TOVA code's choice).

Positions are absolute: keys are cached rotated at the positions transformers gave them (`position_ids`; generate()
derives them from the attention mask, so a left-padded row starts at 0). The `shift` and `loglog` schemes re-rotate
kept keys at every step, which needs raw keys that transformers never hands to a cache: they are refused. Padding:
a token whose attention-mask entry is 0 never enters the state and its query neither scores nor evicts, so a padded
row evolves exactly as it would alone (left padding, as generate() uses; a padded last token in prefill="fast" would
decide that eviction, so pad on the left).

transformers is an optional dependency (`pip install msrnn[hf]`); this is the only module that imports it.
"""
from __future__ import annotations

import math
import threading

import torch

from .errors import CheckpointError, InputError
from .attention import attend, check_unranked
from .config import rope_from_dict
from .model import PREFILL_MODES
from .policies import Policy, layer_budgets
from .rope import inv_frequencies
from .state import EMPTY, LayerState, State

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("msrnn.hf needs transformers: pip install 'msrnn[hf]'") from e

ATTENTION = "msrnn"  # the attn_implementation name: from_pretrained(..., attn_implementation=msrnn.hf.ATTENTION)

# The hand-over from (1) to (2). The two calls follow each other in the same thread inside one attention module's
# forward, so a thread-local "layer updated last" is exact; it is checked on both sides, so a model that does not
# run the "msrnn" attention (and would silently attend without the policy) is an error, not a wrong answer.
_local = threading.local()


class PolicyLayer(CacheLayerMixin):
    """One layer of a PolicyCache: a msrnn LayerState, and the number of tokens (columns) fed so far."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, policy: Policy | None, prefill: str, index: int = 0):
        super().__init__()
        self.policy, self.prefill, self.index = policy, prefill, index
        self.layer_policy: Policy | None = None  # policy.at_layer(index, layers): this layer's own budget (PyramidKV)
        self.state: LayerState | None = None
        self.seen = 0  # tokens fed, padding included: what transformers calls the cache's sequence length
        self.pending = None  # (keys, values, positions) handed from update() to policy_attention
        self.rope = None  # (RopeConfig, length, inv_freq (hd/2,)) for a policy that needs_queries (frequencies)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True  # the LayerState itself is made by `bind`, once the layer's budget is known

    def bind(self, layers: int, key_states: torch.Tensor, value_states: torch.Tensor) -> Policy | None:
        """This layer's policy, known once the model's depth is (`layers`, from the attention module's config),
        and the layer's state, preallocated for that policy's budget."""
        if self.layer_policy is None and self.policy is not None:
            self.layer_policy = self.policy.at_layer(self.index, layers)
        if self.state is None:
            self.state = _empty_layer(key_states, value_states, getattr(self.layer_policy, "states", None))
        return self.layer_policy

    @property
    def keys(self):  # the states held, (B, Hkv, n, hd): what DynamicLayer exposes under the same name
        return None if self.state is None else self.state.keys[:, :, : self.state.size]

    @keys.setter
    def keys(self, value):  # CacheLayerMixin.__init__ sets None; the LayerState owns the buffers
        pass

    @property
    def values(self):
        return None if self.state is None else self.state.values[:, :, : self.state.size]

    @values.setter
    def values(self, value):
        pass

    @property
    def positions(self):
        """(B, Hkv, n) the absolute position of every state held (EMPTY = -1 for a hole)."""
        return None if self.state is None else self.state.pos[:, :, : self.state.size]

    def update(self, key_states, value_states, *args, **kwargs):
        """Hand the T new keys and values (B, Hkv, T, hd) to the attention function; they enter the state there."""
        _check_previous_consumed()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, T, _ = key_states.shape
        position_ids = (kwargs.get("kwargs") or {}).get("position_ids")
        if position_ids is None:  # the model did not pass them down: the next columns
            pos = torch.arange(self.seen, self.seen + T, device=key_states.device).expand(B, T)
        else:
            pos = position_ids.to(key_states.device, torch.int64).expand(B, T)  # (B, T)
        self.seen += T
        self.pending = (key_states, value_states, pos)
        _local.layer = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen, self.pending, self.is_initialized = None, 0, None, False

    def _rows(self, index: torch.Tensor) -> None:
        s = self.state
        if s is not None:
            index = index.to(s.pos.device)
            s.keys, s.values = s.keys.index_select(0, index), s.values.index_select(0, index)
            s.pos, s.score = s.pos.index_select(0, index), s.score.index_select(0, index)
            s.norms = None if s.norms is None else s.norms.index_select(0, index)
            s.maybe_empty, s.full_at = True, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_select_indices(self, indices) -> None:
        if self.state is not None:  # indices may be a tensor on the model's device: index a range made there
            rows = torch.arange(self.state.keys.shape[0], device=self.state.keys.device)
            self._rows(rows[indices.to(rows.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self._rows(torch.arange(self.state.keys.shape[0]).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise InputError("a PolicyCache cannot be cropped: evicted states are gone (assisted decoding and "
                             "rollbacks need a DynamicCache).")

    def offload(self):
        raise InputError("a PolicyCache does not offload; its states are already bounded by the policy's budget.")


def _empty_layer(key_states, value_states, states: int | None) -> LayerState:
    """A LayerState for the rows and heads of key_states (B, Hkv, T, hd), with room for `states` (None: unbounded)."""
    B, Hkv, _, hd = key_states.shape
    capacity = states + 2 if states is not None else 64  # k + the incoming token + a spare slot; grows if needed
    dev = key_states.device
    return LayerState(
        keys=torch.zeros(B, Hkv, capacity, hd, dtype=key_states.dtype, device=dev),
        values=torch.zeros(B, Hkv, capacity, hd, dtype=value_states.dtype, device=dev),
        pos=torch.full((B, Hkv, capacity), EMPTY, dtype=torch.int64, device=dev),
        score=torch.zeros(B, Hkv, capacity, dtype=torch.float32, device=dev),
        maybe_empty=False,
    )


class PolicyCache(Cache):
    """A transformers Cache that keeps at most `policy.states` states per layer, chosen by a msrnn Policy (a
    policy with a budget per layer, PyramidKV or `make_policy(name, [k_0, k_1, ...])`, keeps k_i in layer i).

    policy: any msrnn Policy (built-in, `make_policy(...)`, your own class, `RowPolicies` for per-row budgets),
    or None for the unbounded transformer. prefill: "exact" (a prompt evicts token by token, as msrnn's
    recurrence and `model.prefill(mode="exact")`) or "fast" (one eviction after each multi-token call, as
    `prefill(mode="fast")`). The model must run the "msrnn" attention (`attn_implementation=msrnn.hf.ATTENTION`
    at load, or `model.set_attn_implementation(msrnn.hf.ATTENTION)`)."""

    def __init__(self, policy: Policy | None = None, prefill: str = "exact", state: State | None = None):
        """state: continue a msrnn State (its LayerStates are used, not copied: the cache updates it in place)."""
        if policy is not None and not isinstance(policy, Policy):
            raise InputError(f"policy must be a msrnn.policies.Policy (or None for unbounded), got "
                             f"{type(policy).__name__}; build one with msrnn.policies.make_policy(name, states).")
        if prefill not in PREFILL_MODES:
            raise InputError(f"prefill={prefill!r} is unknown; choose 'exact' or 'fast'.")
        if getattr(policy, "needs_surprise", False):  # the cache never sees the logits that measure it
            raise InputError(f"policy {policy.name!r} ranks states by the model's surprise at each token, which a "
                             "transformers cache cannot see (it gets keys and values, not logits); run it with msrnn's "
                             "own model (msrnn.load) instead of PolicyCache.")
        if getattr(policy, "positions", "absolute") != "absolute":
            raise InputError(f"positions={policy.positions!r} moves keys to new positions (rotated at use, or "
                             "renumbered), which transformers' cache does not allow; use positions='absolute' with "
                             "PolicyCache.")
        super().__init__(layers=[])
        self.policy, self.prefill = policy, prefill
        if state is not None:
            if state.rope_at_use:
                raise InputError("this State caches un-rotated keys (shift/loglog positions); PolicyCache needs "
                                 "absolute positions.")
            for i, layer_state in enumerate(state.layers):
                layer = PolicyLayer(policy, prefill, i)
                layer.state, layer.device, layer.is_initialized = layer_state, layer_state.keys.device, True
                layer.seen = int(state.next_pos.max())
                self.layers.append(layer)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:  # layers appear as the model first reaches them
            self.layers.append(PolicyLayer(self.policy, self.prefill, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def sizes(self) -> list[int]:
        """States held per layer (n in the paper; at most the budget after every step)."""
        return [0 if l.state is None else l.state.size for l in self.layers]

    def __repr__(self) -> str:
        return f"PolicyCache({self.policy!r}, prefill={self.prefill!r}, sizes={self.sizes})"


def _check_previous_consumed() -> None:
    last = getattr(_local, "layer", None)
    if last is not None and last.pending is not None:
        _local.layer, last.pending = None, None
        raise InputError(f"a PolicyCache was used by a model whose attention is not msrnn's; load the model with "
                         f"attn_implementation={ATTENTION!r} (after `import msrnn.hf`) or call "
                         f"model.set_attn_implementation({ATTENTION!r}).")


def policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     **kwargs):
    """The attention implementation "msrnn": the T new tokens enter the layer's state, attend to what it holds,
    and the policy evicts (`msrnn.attention.attend`). query (B, H, T, hd) rotated; key, value (B, Hkv, T, hd) are the
    ones PolicyLayer.update was given; attention_mask (B, T) bool from `_new_tokens_mask` (False = padding) or None.
    Returns (B, T, H, hd) and no attention weights (transformers' contract)."""
    layer = getattr(_local, "layer", None)
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        raise InputError(f"attn_implementation={ATTENTION!r} runs only with a msrnn.hf.PolicyCache: pass "
                         "past_key_values=PolicyCache(policy) (use_cache=True).")
    k, v, pos = layer.pending
    layer.pending = None
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise InputError(f"this model's attention uses {name!r}, which msrnn's attention does not implement.")
    B, H, T, hd = query.shape
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (B, T)):
        raise InputError("PolicyCache takes a 2D attention mask (batch, tokens) of 1s and 0s; a prepared 4D mask "
                         "cannot say which states a policy has kept. Pass the 2D padding mask.")
    Hkv = k.shape[1]
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if layers is None and type(layer.policy).at_layer is not Policy.at_layer:
        raise InputError(f"policy {layer.policy.name!r} has a budget per layer, but this model's attention module "
                         "has no config.num_hidden_layers to say how many layers there are.")
    policy = layer.bind(layers, k, v)  # this layer's policy: its own budget (PyramidKV)
    each_token = layer.prefill == "exact" or T == 1
    if policy is not None and each_token and T > 1 and not policy.layer_local:
        raise InputError(f"policy {policy.name!r} is not layer_local, so a prompt cannot run layer-major through "
                         "transformers; feed the prompt one token per call, or use PolicyCache(..., prefill='fast').")
    q = query.view(B, Hkv, H // Hkv, T, hd)  # query head h reads kv head h // G, as transformers' repeat_kv
    if scaling is not None and not math.isclose(scaling, hd**-0.5, rel_tol=1e-6):
        q = q * (scaling * math.sqrt(hd))  # msrnn scales by 1/sqrt(hd); fold a model's own scaling into q
    inv_freq = frequencies(layer, module, hd, k.device) if getattr(policy, "needs_queries", False) else None
    out = attend(q, k, v, layer.state, pos, policy, each_token, "absolute", inv_freq, sliding_window,
                 valid=attention_mask, fused=True)  # (B, T, H*hd)
    check_unranked([layer.state], lambda i: policy)
    return out.view(B, T, H, hd), None


def frequencies(layer: PolicyLayer, module, hd: int, device) -> torch.Tensor:
    """The model's RoPE frequencies (hd/2,), for a policy that reads the newest query (needs_queries:
    expected-attention), from the attention module's config as msrnn's own model computes them; kept on the layer
    (dynamic scaling: recomputed for the tokens fed so far, which transformers' rotation may round otherwise)."""
    if layer.rope is None:
        layer.rope = (rope_from_dict(module.config.to_dict()), None, None)
    rope, length, inv_freq = layer.rope
    seen = layer.seen if rope.type == "dynamic" else 0
    if length != seen:
        inv_freq = inv_frequencies(rope, hd, module.config.max_position_embeddings, seen).to(device)
        layer.rope = (rope, seen, inv_freq)
    return inv_freq


def _new_tokens_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, **kwargs):
    """The mask function "msrnn": which of the q_length new tokens are real (B, T) bool, or None if all are. The
    2D attention mask covers the past and the new tokens; the past's padding never entered the state."""
    if attention_mask is None:
        return None
    new = attention_mask[:, -q_length:].to(torch.bool)
    return None if bool(new.all()) else new


AttentionInterface.register(ATTENTION, policy_attention)
AttentionMaskInterface.register(ATTENTION, _new_tokens_mask)


# --- msrnn's recurrence interface on a transformers model: what `msrnn eval ppl --backend transformers` steps -------
class Recurrence:
    """A transformers causal LM behind the few methods of `msrnn.Transformer` that msrnn's evaluation calls
    (`init_state`, `prefill`, `step`, `cfg.vocab_size`, `identity`), its states plain msrnn `State`s stepped through
    a PolicyCache. So `msrnn.eval` runs unchanged on any transformers model, and the two backends give the same
    tables (tests/test_hf.py)."""

    def __init__(self, model, identity: str = "transformers"):
        model.set_attn_implementation(ATTENTION)
        self.hf = model
        text = model.config.get_text_config(decoder=True)
        self.cfg = _Dims(text)
        self.identity = identity

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def init_state(self, batch_size: int = 1, policy: Policy | None = None) -> State:
        if getattr(policy, "positions", "absolute") != "absolute":
            raise InputError("the transformers backend runs absolute positions only (transformers caches keys "
                             "already rotated); drop --positions.")
        capacity = [k + 2 if k is not None else 64 for k in layer_budgets(policy, self.cfg.num_hidden_layers)]
        device = self.hf.get_input_embeddings().weight.device
        return State.empty(self.cfg.num_hidden_layers, batch_size, self.cfg.num_key_value_heads, self.cfg.head_dim,
                           capacity, self.dtype, meta={"model": self.identity}, device=device)

    @torch.inference_mode()
    def prefill(self, tokens, state: State | None = None, policy: Policy | None = None, mode: str = "exact",
                all_logits: bool = False, chunk: int | None = None, progress=None):
        """tokens (B, T) -> logits of the last token (B, V) fp32, or of every token (B, T, V); `state` advances.
        One transformers forward per call (layer-major, evicting token by token in "exact" mode, as msrnn)."""
        tokens = torch.as_tensor(tokens)
        if state is None:
            state = self.init_state(tokens.shape[0], policy)
        if mode == "exact" and tokens.shape[1] > 1 and policy is not None and not policy.layer_local:
            logits = [self.prefill(tokens[:, t : t + 1], state, policy, mode, True)[0] for t in range(tokens.shape[1])]
            if progress is not None:  # token by token, as msrnn's prefill runs such a policy
                progress(tokens.shape[1])
            logits = torch.cat(logits, dim=1)  # (B, T, V)
            return (logits if all_logits else logits[:, -1]), state
        device = self.hf.get_input_embeddings().weight.device
        T = tokens.shape[1]
        position_ids = (state.next_pos[:, None] + torch.arange(T, device=state.next_pos.device)).to(device)
        logits = self.hf(tokens.to(device), position_ids=position_ids,
                         cache=PolicyCache(policy, mode, state), use_cache=True).logits.float()  # (B, T, V)
        state.next_pos = state.next_pos + T
        if progress is not None:
            progress(T)
        return (logits if all_logits else logits[:, -1]), state

    def step(self, tokens, state: State | None = None, policy: Policy | None = None):
        logits, state = self.prefill(torch.as_tensor(tokens)[:, None], state, policy)
        return logits, state


class _Dims:
    """The shape of a transformers text config, under msrnn's Config names."""

    def __init__(self, config):
        self.vocab_size = config.vocab_size
        self.num_hidden_layers = config.num_hidden_layers
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.max_position_embeddings = config.max_position_embeddings


def load(source=None, dtype="fp32", device: str = "cpu"):
    """(Recurrence, msrnn Tokenizer) for a checkpoint directory, hub id or .gguf file (None: the bundled SmolLM2),
    loaded by transformers. The tokenizer is msrnn's, so both backends read the same token ids."""
    from transformers import AutoModelForCausalLM

    from .tokenizer import Tokenizer
    from .weights import parse_format, resolve

    fmt = parse_format(dtype)
    if fmt in ("int8", "int4"):
        raise InputError(f"dtype {fmt}: the transformers backend runs float weights; use fp32 or bf16 (or msrnn's own "
                         "backend for int weights).")
    path = resolve(source)
    torch_dtype = torch.bfloat16 if fmt == "bf16" else torch.float32  # auto: transformers dequantizes GGUF to float
    kwargs = {"dtype": torch_dtype, "attn_implementation": ATTENTION}
    if device != "cpu":
        kwargs["device_map"] = device  # a device, or "auto" to shard over several (accelerate)
    try:
        if path.is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"transformers could not load {path}: {type(e).__name__}: {e}") from None
    return Recurrence(model.eval(), identity=f"transformers:{path.name}"), Tokenizer.from_pretrained(path)
