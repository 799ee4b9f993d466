"""`msrnn bench`: speed and memory of the bounded recurrence, side by side with transformers in the same process.

What is measured (batch 1 unless said, the model's dtype, `--threads` torch threads):
- floor: the chained matrix-vector products over the model's weight shapes, nothing else. No decoder can read its
  weights faster than this on this machine; it tells how much of a token's time is overhead.
- decode ms/token at several stream positions, for the unbounded state and for a bounded policy (TOVA by default)
  at each of its budgets (`--states 128,256`, or one per layer: `--states "[96,64,32]"`), every budget timed in
  turn with the others at each position. Positions are reached with a chunked prefill; the state is then stepped
  one token at a time and timed.
- transformers' decode ms/token with its default cache at the same positions (if transformers is installed).
- prefill seconds for a prompt of `--prefill-tokens`.
- throughput under a fixed KV-memory budget (the paper's Table 1): the full cache of `--budget-context` tokens at batch
  1 holds as many bytes as `budget-context / k` rows of k states, so bounded states run a bigger batch.
- resident memory along a long bounded stream (`--stream-tokens`, TOVA 512 by default): it must stay flat.
- for bf16/int8/int4 weights, the agreement of its logits with the same checkpoint in float32.
- the floor of the same weight shapes in each format (fp32, bf16, int8, int4), timed in turn: what --dtype can gain.
- peak RSS (resident memory high-water mark) after each phase.
Timings are medians over repeats; no test asserts on them (machines differ).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import llama_cpp, quant, surprise
from .errors import CheckpointError, InputError
from .grid import budget_label, check_layers, parse_budgets
from .report import current_rss_mib, peak_rss_mib, pyplot, round_robin
from .policies import make_policy


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def filling(policy) -> str:
    """The prefill mode that fills a state to a position: fast, unless the policy reads surprise (exact only)."""
    return "exact" if surprise.settings(policy) is not None else "fast"


def advance(model, state, policy, length: int, chunk: int = 512, batch: int = 1):
    """Bring `state` to stream position `length` with chunked prefills (fast mode: one eviction per chunk; exact
    for a policy that reads the model's surprise, which a fast prefill cannot give it)."""
    gen = torch.Generator().manual_seed(0)
    mode = filling(policy)
    done = int(state.next_pos.min())
    while done < length:
        n = min(chunk, length - done)
        model.prefill(torch.randint(0, model.cfg.vocab_size, (batch, n), generator=gen), state, policy, mode=mode)
        done += n
    return state


def stream_memory(model, policy, tokens: int, piece: int = 256, warmup: int = 2000, progress=True) -> dict:
    """Resident memory along one long bounded stream, fed in pieces of `piece` tokens (fast prefill: one eviction
    per piece, the cheapest way through 70k tokens that still writes every token into the state)."""
    from tqdm import tqdm

    state = model.init_state(1, policy)
    gen = torch.Generator().manual_seed(0)
    trace = []
    for start in tqdm(range(0, tokens, piece), desc="stream memory", leave=False, disable=not progress):
        n = min(piece, tokens - start)
        model.prefill(torch.randint(0, model.cfg.vocab_size, (1, n), generator=gen), state, policy,
                      mode=filling(policy))
        trace.append((start + n, current_rss_mib()))
    after = [mb for t, mb in trace if t >= warmup] or [trace[-1][1]]
    return {"tokens": tokens, "warmup": warmup, "rss_mb_after_warmup": after[0], "rss_mb_end": trace[-1][1],
            "growth_after_warmup": trace[-1][1] / after[0] - 1, "trace": trace[:: max(1, len(trace) // 50)]}


def agreement_with_fp32(model, source: Path, tokens: int = 256) -> dict:
    """How far a reduced-precision model's logits are from the same checkpoint in float32 (parallel forward)."""
    from .weights import load_model

    ref = load_model(source, dtype=torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    a, b = ref(ids)[0], model(ids)[0]  # (T, vocab) fp32 logits
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)  # KL(fp32 || this)
    return {"tokens": tokens, "max_abs_logit_diff": float((a - b).abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "mean_kl": float(kl.mean())}


def in_turn(runs: dict, rounds: int = 5, clock=time.perf_counter) -> dict[str, list[float]]:
    """Seconds of each run in every round, timed in turn (report.round_robin). clock=time.process_time counts this
    process's CPU time only (not the time other tenants held the cores)."""
    def timed(fn):
        def run() -> float:
            t0 = clock()
            fn()
            return clock() - t0
        return run

    return round_robin({name: timed(fn) for name, fn in runs.items()}, rounds)


def side_by_side(runs: dict, rounds: int = 5, clock=time.perf_counter) -> dict:
    """Median seconds of each run over `rounds`, timed in turn (see in_turn)."""
    return {name: statistics.median(t) for name, t in in_turn(runs, rounds, clock).items()}


def msrnn_decoder(model, policy, position: int, steps: int, batch: int = 1):
    """A function that decodes `steps` tokens from stream position `position` (the state is left as it ends)."""
    state = advance(model, model.init_state(batch, policy), policy, position, batch=batch)
    token = torch.full((batch,), 42 % model.cfg.vocab_size)  # any token: 42 in a real vocabulary
    return lambda: [model.step(token, state, policy) for _ in range(steps)]


def floor_chain(model):
    """One token's worth of matrix-vector products over every weight matrix of the model, in its own formats (int
    kernels get the bf16 input they take), and nothing else."""
    layers = [m for m in model.modules() if isinstance(m, quant.LINEARS)]
    calls = [(m, torch.randn(1, m.in_features, dtype=torch.bfloat16 if isinstance(m, quant.INT_LAYERS) else model.dtype))
             for m in layers]  # int kernels take bf16 activations
    if model.lm_head is None:  # tied float head: the embedding matrix
        calls.append((lambda x: F.linear(x, model.embed.weight), torch.randn(1, model.cfg.hidden_size, dtype=model.dtype)))
    return lambda: [m(x) for m, x in calls]


def format_floors(model, rounds: int = 5) -> dict:
    """The floor of this model's shapes in every weight format (random weights), timed in turn: what each --dtype
    could reach on this machine."""
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, quant.LINEARS)]
    if model.lm_head is None:
        shapes.append(tuple(model.embed.weight.shape))
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for fmt in ("fp32", "bf16", "int8", "int4"):
        try:
            calls = [(quant.linear(fmt, torch.randn(n, k, generator=gen) * 0.02),
                      torch.randn(1, k, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)) for n, k in shapes]
        except CheckpointError:  # int4 needs input sizes divisible by 32
            continue
        runs[fmt] = lambda calls=calls: [m(x) for m, x in calls]
    return {fmt: t * 1000 for fmt, t in side_by_side(runs, rounds).items()}


class HFRunner:
    """transformers' model for the same checkpoint, default attention and cache (the thing users compare to)."""

    def __init__(self, source: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()  # its GGUF conversion bars would interleave with ours
        gguf = dict(gguf_file=source.name) if source.is_file() else {}  # a GGUF: its folder and its name
        self.model = AutoModelForCausalLM.from_pretrained(source.parent if gguf else source, dtype=dtype, **gguf)
        self.model.eval()

    @torch.inference_mode()
    def decoder(self, position: int, steps: int):
        """A function that decodes `steps` tokens from `position` with transformers' DynamicCache, then crops the
        cache back, so that every call starts from the same position."""
        from transformers import DynamicCache

        gen = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        cache = DynamicCache(config=self.model.config)
        for start in range(0, position, 512):
            n = min(512, position - start)
            self.model(torch.randint(0, vocab, (1, n), generator=gen), cache=cache, use_cache=True)
        token = torch.tensor([[42]])

        @torch.inference_mode()
        def run():
            for _ in range(steps):
                self.model(token, cache=cache, use_cache=True)
            cache.crop(-steps)  # a negative crop removes that many tokens

        return run

    def decode_ms(self, position: int, steps: int) -> float:
        return timed(self.decoder(position, steps), 3) / steps * 1000


def check_throughput(budget_context: int, budget_states) -> None:
    """The throughput table is relative to the full cache of `budget_context` tokens at batch 1: one of
    `budget_states` must reach it (checked before anything is timed)."""
    if not any(k >= budget_context for k in budget_states):
        raise InputError(f"--budget-states {','.join(map(str, budget_states))}: none reaches --budget-context "
                         f"{budget_context}, the full cache every throughput row is compared with; add "
                         f"{budget_context} to --budget-states (e.g. --budget-states "
                         f"{','.join(map(str, [*budget_states, budget_context]))}) or lower --budget-context.")


class Bench:
    """The measurements of `msrnn bench`, one method per phase, each writing its part of `res` (module docstring).
    The floor is timed beside every contender (it drifts with them); transformers' full cache is held at the
    longest unbounded position, which is what the bounded state is compared against."""

    def __init__(self, model, source: Path | None, policy_name="tova", states=(256,), positions=(16, 512, 2000),
                 bounded_positions=(2000, 8000, 20000), steps=16, prefill_tokens=512, budget_context=2048,
                 budget_states=(256, 512, 1024, 2048), compare=True, stream_tokens=70000, stream_states=512,
                 rounds=5, progress=True):
        check_throughput(budget_context, budget_states)
        self.model, self.source, self.policy_name, self.progress = model, source, policy_name, progress
        # states: one budget (an int) or several, each an int or a list with one budget per layer
        budgets = [states] if isinstance(states, int) else [tuple(k) if isinstance(k, list) else k for k in states]
        self.policies = {budget_label(k): make_policy(policy_name, k) for k in budgets}  # "256" or "[96,64,32]"
        self.positions, self.bounded_positions, self.steps, self.rounds = positions, bounded_positions, steps, rounds
        self.prefill_tokens, self.budget_context, self.budget_states = prefill_tokens, budget_context, budget_states
        self.stream_tokens, self.stream_states = stream_tokens, stream_states
        self.hf, self.floor, self.floors = None, floor_chain(model), []
        self.res = {"dtype": quant.weight_format(model), "threads": torch.get_num_threads(),
                    "policy": policy_name, "states": [list(k) if isinstance(k, tuple) else k for k in budgets],
                    "steps": steps, "rounds": rounds,
                    "cpu": torch.backends.cpu.get_cpu_capability()}
        self.phases = ([self.load_transformers] if compare else []) + [
            self.decode_full, self.decode_bounded, self.prefill, self.throughput]
        self.phases += ([self.stream] if stream_tokens else []) + (
            [self.fp32_agreement] if self.res["dtype"] != "fp32" else []) + [self.floors_by_format]

    def run(self) -> dict:
        from .report import progress

        with progress(len(self.phases), "bench", unit="phase", disable=not self.progress) as bar:
            for phase in self.phases:
                bar.set_postfix_str(phase.__name__)
                phase()
                self.res.setdefault("peak_rss_mb", {})[phase.__name__.replace("_", " ")] = peak_rss_mib()
                bar.update(1)
        res = self.res
        res["floor_ms"] = statistics.median(self.floors)
        res["floor_ms_range"] = [min(self.floors), max(self.floors)]
        if res.get("hf_full_ms"):
            res["ratio_full"] = {p: res["msrnn_full_ms"][p] / res["hf_full_ms"][p] for p in self.positions}
            res["ratio_bounded_vs_hf_full"] = {k: {q: ms[q] / res["hf_full_at_ms"][q] for q in self.bounded_positions}
                                               for k, ms in res["msrnn_bounded_ms"].items()}
            res["hf_full_at"] = max(self.positions)
        return res

    def _ms(self, runs: dict) -> dict:
        """Seconds per step of each run, timed in turn; the floor's time is kept for the report."""
        t = side_by_side({"floor": self.floor, **runs}, self.rounds)
        self.floors.append(t["floor"] * 1000)
        return {name: t[name] / self.steps * 1000 for name in runs}

    def load_transformers(self) -> None:
        try:
            self.hf = HFRunner(self.source, self.model.dtype)
        except ImportError:
            self.res["transformers"] = "not installed"

    def decode_full(self) -> None:
        full, hf = self.res.setdefault("msrnn_full_ms", {}), self.res.setdefault("hf_full_ms", {})
        for p in self.positions:
            runs = {"msrnn": msrnn_decoder(self.model, None, p, self.steps)}
            if self.hf is not None:
                runs["hf"] = self.hf.decoder(p, self.steps)
            ms = self._ms(runs)
            full[p] = ms["msrnn"]
            if self.hf is not None:
                hf[p] = ms["hf"]

    def decode_bounded(self) -> None:
        """Every budget at each bounded position, timed in turn with the others (msrnn_bounded_ms[budget][q])."""
        bounded = self.res.setdefault("msrnn_bounded_ms", {k: {} for k in self.policies})
        hf = self.res.setdefault("hf_full_at_ms", {})
        hf_ref = self.hf.decoder(max(self.positions), self.steps) if self.hf is not None else None
        for q in self.bounded_positions:
            runs = {k: msrnn_decoder(self.model, policy, q, self.steps) for k, policy in self.policies.items()}
            if hf_ref is not None:
                runs["transformers"] = hf_ref  # not a budget label: those are numbers or [...]
            ms = self._ms(runs)
            for k in self.policies:
                bounded[k][q] = ms[k]
            if hf_ref is not None:
                hf[q] = ms["transformers"]  # transformers at the longest unbounded position, timed beside q

    def prefill(self) -> None:
        toks = torch.randint(0, self.model.cfg.vocab_size, (1, self.prefill_tokens))
        runs = {"msrnn": lambda: self.model(toks)}
        if self.hf is not None:
            runs["hf"] = torch.inference_mode()(lambda: self.hf.model(toks))
        t = side_by_side(runs, max(2, self.rounds // 2))
        self.res["msrnn_prefill_s"], self.res["prefill_tokens"] = t["msrnn"], self.prefill_tokens
        if self.hf is not None:
            self.res["hf_prefill_s"] = t["hf"]

    def throughput(self) -> None:
        rows = []
        for k in self.budget_states:
            batch = max(1, self.budget_context // k)
            pol = None if k >= self.budget_context else make_policy(self.policy_name, k)
            ms = timed(msrnn_decoder(self.model, pol, self.budget_context, self.steps, batch=batch), 3)
            ms = ms / self.steps * 1000
            rows.append({"states": k, "batch": batch, "ms_per_step": ms, "tokens_per_s": batch / ms * 1000})
        full = next(r for r in rows if r["states"] >= self.budget_context)
        for r in rows:
            r["ratio_to_full"] = r["tokens_per_s"] / full["tokens_per_s"]
        self.res["throughput"] = rows

    def stream(self) -> None:
        self.res["stream"] = stream_memory(self.model, make_policy(self.policy_name, self.stream_states),
                                           self.stream_tokens, progress=self.progress)
        self.res["stream"]["states"] = self.stream_states

    def floors_by_format(self) -> None:
        self.res["floor_ms_by_format"] = format_floors(self.model, self.rounds)

    def fp32_agreement(self) -> None:
        self.res["fp32_agreement"] = agreement_with_fp32(self.model, self.source)


def run_bench(model, source: Path | None, **settings) -> dict:
    """All measurements as one dict (see Bench and the module docstring)."""
    return Bench(model, source, **settings).run()


def report(res: dict) -> str:
    """The measurements as markdown tables."""
    lo, hi = res["floor_ms_range"]
    compiled = ", compiled step (--compile)" if res.get("compiled") else ""
    out = [f"machine: {res['cpu']}, {res['threads']} threads, weights {res['dtype']}{compiled}; every row timed in turn "
           f"with its comparison and the floor ({res['rounds']} rounds, medians)",
           f"floor (weight matvecs only): {res['floor_ms']:.1f} ms/token (range over the run {lo:.1f}-{hi:.1f})"]
    if "floor_ms_by_format" in res:
        out.append("floors of the same shapes per weight format (timed in turn): " + ", ".join(
            f"{fmt} {ms:.1f} ms" for fmt, ms in res["floor_ms_by_format"].items()))
    out += ["",
           "| decode, batch 1 | position | ms/token | × floor | × transformers |", "|---|---|---|---|---|"]
    for p, ms in res["msrnn_full_ms"].items():
        hf = res.get("hf_full_ms", {}).get(p)
        ratio = f"{ms / hf:.2f}" if hf else "–"
        out.append(f"| msrnn full | {p} | {ms:.1f} | {ms / res['floor_ms']:.2f} | {ratio} |")
    for p, ms in res.get("hf_full_ms", {}).items():
        out.append(f"| transformers full | {p} | {ms:.1f} | {ms / res['floor_ms']:.2f} | 1.00 |")
    for k, by_position in res["msrnn_bounded_ms"].items():  # one row per budget and position
        for p, ms in by_position.items():
            hf = res.get("hf_full_at_ms", {}).get(p)
            ratio = f"{ms / hf:.2f} (vs its full cache at {res['hf_full_at']}: {hf:.1f} ms)" if hf else "–"
            out.append(f"| msrnn {res['policy']} {k} | {p} | {ms:.1f} | {ms / res['floor_ms']:.2f} | {ratio} |")
    tokens = f" of {res['prefill_tokens']} tokens" if "prefill_tokens" in res else ""  # older bench.json: unsaid
    out += ["", f"prefill of a prompt{tokens}: msrnn {res['msrnn_prefill_s']:.2f} s"
            + (f", transformers {res['hf_prefill_s']:.2f} s" if "hf_prefill_s" in res else ""), "",
            "| throughput under the KV budget of a full cache | states | batch | ms/step | tokens/s | × full |",
            "|---|---|---|---|---|---|"]
    for r in res["throughput"]:
        out.append(f"| {'full' if r['ratio_to_full'] == 1 and r['batch'] == 1 else res['policy']} | {r['states']} | "
                   f"{r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {r['ratio_to_full']:.2f} |")
    if "stream" in res:
        m = res["stream"]
        out += ["", f"memory over a {m['tokens']}-token stream with {res['policy']} {m['states']}: resident "
                f"{m['rss_mb_after_warmup']:.0f} MB after {m['warmup']} tokens, {m['rss_mb_end']:.0f} MB at the end "
                f"({100 * m['growth_after_warmup']:+.2f} %)"]
    if "fp32_agreement" in res:
        a = res["fp32_agreement"]
        out += ["", f"{res['dtype']} vs float32 on {a['tokens']} tokens: max |Δ logit| {a['max_abs_logit_diff']:.3f}, "
                f"top-1 agreement {100 * a['top1_agreement']:.1f} %, mean KL {a['mean_kl']:.2e}"]
    out += llama_cpp.report_lines(res["llama_cpp"]) if "llama_cpp" in res else []
    out += ["", "peak RSS (MB) after each phase: " + ", ".join(f"{k} {v:.0f}" for k, v in res["peak_rss_mb"].items())]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    def xy(ms: dict):  # positions are int keys in a live result, strings once read back from bench.json
        return [int(p) for p in ms], list(ms.values())

    a.plot(*xy(res["msrnn_full_ms"]), "o-", label="msrnn full")
    if res.get("hf_full_ms"):
        a.plot(*xy(res["hf_full_ms"]), "s-", label="transformers full")
    for i, (k, ms) in enumerate(res["msrnn_bounded_ms"].items()):  # one line per budget
        a.plot(*xy(ms), "^-", color=f"C{2 + i}", label=f"msrnn {res['policy']} {k}")
    a.axhline(res["floor_ms"], color="gray", ls="--", label="floor (weight matvecs)")
    a.set(xscale="log", xlabel="stream position (tokens)", ylabel="ms / token", title=f"decode, batch 1, {res['dtype']}")
    positions = sorted({int(p) for ms in [res["msrnn_full_ms"], *res["msrnn_bounded_ms"].values()] for p in ms})
    a.set_xticks(positions, [f"{p:,}" for p in positions], rotation=30)  # the positions measured, as plain numbers
    a.minorticks_off()
    a.set_ylim(bottom=0)
    a.legend()
    rows = res["throughput"]
    b.bar([str(r["states"]) for r in rows], [r["tokens_per_s"] for r in rows], color="C2")  # the bounded policy's colour
    for i, r in enumerate(rows):
        b.text(i, r["tokens_per_s"], f"{r['ratio_to_full']:.1f}× (B={r['batch']})", ha="center", va="bottom")
    b.set_ylim(0, 1.12 * max(r["tokens_per_s"] for r in rows))  # room for the labels above the bars
    b.set(xlabel="states per layer", ylabel="tokens / s", title="throughput under the full cache's KV memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}.") from None


def run(args) -> int:
    """`msrnn bench` (it loads the model itself: transformers needs the same source)."""
    from .weights import load_model, resolve

    if getattr(args, "device", "cpu") != "cpu":
        raise InputError(f"--device {args.device}: msrnn bench times the CPU only (its floors and the transformers "
                         "comparison run there); drop --device.")
    lists = {key: _ints(getattr(args, key)) for key in ("positions", "bounded_positions", "budget_states")}
    budgets = parse_budgets(args.states)  # "256", "128,256" or "64,[96,64,32]": as eval ppl's --states
    counts = {"--steps": args.steps, "--prefill-tokens": args.prefill_tokens,
              "--budget-context": args.budget_context, "--stream-states": args.stream_states,
              **{f"--{k.replace('_', '-')}": min(v, default=0) for k, v in lists.items()}}
    for option, value in counts.items():  # every number checked before a policy file runs or the model loads
        if value < 1:
            raise InputError(f"{option}: give positive numbers (--stream-tokens may be 0 to skip the stream).")
    if args.stream_tokens < 0:
        raise InputError("--stream-tokens: give a positive number, or 0 to skip the stream.")
    check_throughput(args.budget_context, lists["budget_states"])
    llama = args.compare == "llama.cpp" and llama_cpp.find_llama_bench(getattr(args, "llama_bench", None))
    for k in budgets:  # an unknown name, a bad file:Class or a budget the policy refuses, before minutes of loading
        make_policy(args.policy, k)
    source = resolve(args.model)  # None: the bundled GGUF
    gguf = llama and llama_cpp.check_gguf(source)
    model = load_model(source, dtype=args.dtype)
    check_layers([args.policy], budgets, model.cfg.num_hidden_layers)  # a per-layer list of the model's depth
    if getattr(args, "compile", False):
        model.compile()  # every decode timing then runs the compiled step (its compile falls in the warm-up runs)
    res = run_bench(model, source, policy_name=args.policy, states=budgets, **lists, steps=args.steps,
                    prefill_tokens=args.prefill_tokens, budget_context=args.budget_context,
                    compare=args.compare == "transformers",
                    stream_tokens=args.stream_tokens, stream_states=args.stream_states)
    res["compiled"] = bool(getattr(args, "compile", False))
    if llama:  # llama-bench and msrnn in turn, on the same file and threads
        res["llama_cpp"] = llama_cpp.side_by_side(model, llama, gguf, prompt=args.prefill_tokens)
    text = report(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    (out / "bench.md").write_text(text + "\n")
    plot(res, out / "bench.png")
    print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0
