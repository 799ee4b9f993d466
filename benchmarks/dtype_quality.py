"""What each --dtype costs in quality on the bundled model: PPL of the full model and of a bounded policy, and how
often its next-token choice agrees with the fp32 reference, on chunks of a real text.

    python benchmarks/dtype_quality.py --text ../shared/data/frankenstein.txt --context 1024 --chunks 2 \
        --out docs/results/dtype

Writes dtype.md (a table) and dtype.json into --out. fp32 is the exact reference (equal to transformers); the other
formats are compared with it on the same chunks: the same chunk selection as `msrnn eval ppl`."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import msrnn
from msrnn import quant
from msrnn.eval import perplexity, pick_chunks
from msrnn.report import progress, read_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,auto,bf16,int8,int4")
    ap.add_argument("--policy", default="tova")
    ap.add_argument("--states", type=int, default=128)
    ap.add_argument("--out", default="out/dtype")
    args = ap.parse_args()
    _, tok = msrnn.load()
    data, _ = pick_chunks(tok.encode(read_text(Path(args.text))), args.context, args.chunks)  # (chunks, context)
    policy = msrnn.make_policy(args.policy, args.states)
    rows, ref_top1 = [], None
    with progress(len(args.dtypes.split(",")), "dtypes", unit="dtype") as bar:
        for fmt in args.dtypes.split(","):
            model = msrnn.load_model(dtype=fmt)
            logits = model(data)[:, :-1]  # (chunks, T-1, vocab) next-token logits
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), data[:, 1:])
            top1 = logits.argmax(-1)
            ref_top1 = top1 if ref_top1 is None else ref_top1
            bounded = perplexity(model, data, policy)  # (chunks, T-1)
            rows.append({"dtype": fmt, "weights": quant.weight_format(model), "ppl_full": math.exp(float(loss)),
                         f"ppl_{args.policy}_{args.states}": math.exp(float(bounded.mean())),
                         "top1_agreement_with_fp32": float((top1 == ref_top1).float().mean())})
            bar.update(1)
    base = rows[0]["ppl_full"]
    key = f"ppl_{args.policy}_{args.states}"
    lines = [f"# --dtype on the bundled SmolLM2-135M-Instruct: {Path(args.text).name}, {args.chunks} x {args.context} "
             "tokens", "", f"| --dtype | weights | PPL full | vs {rows[0]['dtype']} | PPL {args.policy} {args.states} | "
             f"top-1 agreement with {rows[0]['dtype']} |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['weights']} | {r['ppl_full']:.2f} | {100 * (r['ppl_full'] / base - 1):+.2f} % | "
                     f"{r[key]:.2f} | {100 * r['top1_agreement_with_fp32']:.1f} % |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dtype.md").write_text("\n".join(lines) + "\n")
    (out / "dtype.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
