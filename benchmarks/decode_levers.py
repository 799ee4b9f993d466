"""What each speed lever of the decode step and the prefill buys, each timed against itself without it, in turn.

    python benchmarks/decode_levers.py --dtype auto --threads 2 [--compile] [--only compile]

- ring:    a full layer's decode step as one slot write (`attention.ring_step`) vs the general path (append, drop_lowest,
           compact), TOVA-256 at stream position 2,000; next to the full cache at 2,000 and at 16.
- gemm:    a 512-token prefill whose int layers multiply by the unpacked bf16 matrix (`quant.GEMM_ROWS`) vs the int
           matrix-vector kernels.
- compile: the compiled one-token step (`Transformer.compile`, inductor, what `--compile` does) vs eager: the full
           cache at 16 / 512 / 2,000, TOVA-256 and tova-value-256 at 2,000 (--compile: the first compile takes tens of
           seconds); for the bounded ones also each layer's compiled call alone ("per layer": what --compile did
           before the whole-step graph, `Transformer.compile(whole_step=False)`).
Prints a markdown table: median ms over in-turn rounds (wall), and the process's CPU ms per call, which a busy
machine disturbs less than the wall clock."""
from __future__ import annotations

import argparse
import time

import torch

import msrnn
import msrnn.quant
import msrnn.state
from msrnn.bench import msrnn_decoder
from msrnn.policies import make_policy


def timed(runs: dict, rounds: int) -> dict:
    """{name: (wall ms, cpu ms)} medians of each run, the runs alternating round by round; a run is (fn, switch)
    where switch() puts the lever in the state the run needs."""
    for fn, switch in runs.values():
        switch()
        fn()
    out = {name: ([], []) for name in runs}
    for _ in range(rounds):
        for name, (fn, switch) in runs.items():
            switch()
            w, c = time.perf_counter(), time.process_time()
            fn()
            out[name][0].append(time.perf_counter() - w)
            out[name][1].append(time.process_time() - c)
    return {name: tuple(1000 * sorted(v)[len(v) // 2] for v in t) for name, t in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--only", choices=["compile"], help="time the compile lever only (eager vs compiled)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = msrnn.load(dtype=args.dtype)
    tova, steps = make_policy("tova", 256), args.steps
    holds, rows = msrnn.state.LayerState.holds_exactly, msrnn.quant.GEMM_ROWS
    compiled = [block.compiled for block in model.compile().layers] if args.compile else None
    whole = model.compiled_layers if args.compile else None

    def lever(ring=True, gemm=True, compile=False, whole_step=True):
        def switch():
            msrnn.state.LayerState.holds_exactly = holds if ring else (lambda self, policy: False)
            msrnn.quant.GEMM_ROWS = rows if gemm else 1 << 30
            for i, block in enumerate(model.layers):
                block.compiled = compiled[i] if compile else None
            model.compiled_layers = whole if compile and whole_step else None
        return switch

    prompt = torch.randint(0, model.cfg.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    runs = {
        "full cache at 16": (msrnn_decoder(model, None, 16, steps), lever()),
        "full cache at 2,000": (msrnn_decoder(model, None, 2000, steps), lever()),
        "TOVA-256 at 2,000, ring_step": (msrnn_decoder(model, tova, 2000, steps), lever()),
        "TOVA-256 at 2,000, general path": (msrnn_decoder(model, tova, 2000, steps), lever(ring=False)),
        "prefill 512, unpacked bf16 GEMM": (lambda: model.prefill(prompt), lever()),
        "prefill 512, int kernels": (lambda: model.prefill(prompt), lever(gemm=False)),
    }
    if args.only == "compile":
        runs = {}
    if args.compile:
        value = make_policy("tova-value", 256)
        for name, policy, at in [("full cache at 16", None, 16), ("full cache at 512", None, 512),
                                 ("full cache at 2,000", None, 2000), ("TOVA-256 at 2,000", tova, 2000),
                                 ("tova-value-256 at 2,000", value, 2000)]:
            runs[f"{name}, eager"] = (msrnn_decoder(model, policy, at, steps), lever())
            runs[f"{name}, compiled step"] = (msrnn_decoder(model, policy, at, steps), lever(compile=True))
            if policy is not None:  # a bounded state at 2,000 holds its k states: the whole-step graph runs
                runs[f"{name}, compiled per layer"] = (msrnn_decoder(model, policy, at, steps),
                                                       lever(compile=True, whole_step=False))
    t = timed(runs, args.rounds)
    lever()()
    print(f"| {args.dtype}, {torch.get_num_threads()} threads | wall ms | CPU ms |\n|---|---:|---:|")
    for name, (wall, cpu) in t.items():
        per = 1 if name.startswith("prefill") else steps  # decoders run `steps` tokens per call
        print(f"| {name} | {wall / per:.1f} | {cpu / per:.1f} |")


if __name__ == "__main__":
    main()
