"""The trade-off frontier of the bounded policies: needle accuracy against perplexity, each relative to TOVA.

    python benchmarks/frontier.py --needle docs/results/needle/memory-2048 docs/results/needle/memory-2048-sinkfree \
        docs/results/needle/policies-2048 docs/results/needle/surprise-2048 --ppl docs/results/ppl-frankenstein \
        --out docs/results/needle/memory-2048

x: a policy's PPL on the paper's table divided by TOVA's at the same budget (the `--compare tova` paired ratio with
its bootstrap interval where the run has one); y: the share of needles found at depths 0-50 % (the far ones, which
every uniform policy loses), with its Wilson 95 % interval. One point per policy and budget; the full model's
accuracy as a line. Writes frontier.png and frontier.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from msrnn.report import pyplot
from msrnn.stats import wilson


def needle_points(cells: list[dict], far: float) -> dict:
    """(policy, states) -> (found, asked) over depths <= far, and over all depths."""
    out: dict = {}
    for c in cells:
        key = (c["policy"], c["states"])
        f, n, fa, na = out.get(key, (0, 0, 0, 0))
        near = c["depth"] <= far
        out[key] = (f + c["correct"] * near, n + c["answers"] * near, fa + c["correct"], na + c["answers"])
    return out


def ppl_ratios(results: dict, reference: str) -> dict:
    """(policy, states) -> (ratio, low, high) of PPL to `reference`'s at the same budget (paired if recorded)."""
    ppl = {(c["policy"], c["states"]): c["ppl"] for c in results["cells"]}
    out = {}
    for (name, k), value in ppl.items():
        if (reference, k) in ppl and name != "full":
            out[name, k] = (value / ppl[reference, k], None, None)
    for p in results.get("paired", []):  # the --compare run's bootstrap interval of the paired ratio
        key = (p.get("policy"), p.get("states"))
        if key in out and p.get("ratio") is not None:
            out[key] = (p["ratio"], p.get("ratio_low"), p.get("ratio_high"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--needle", required=True, nargs="+",
                    help="`eval needle` folders (results.json); the full model's cells are taken from the first")
    ap.add_argument("--ppl", required=True, help="an `eval ppl` folder (results.json) with the same policies")
    ap.add_argument("--reference", default="tova")
    ap.add_argument("--far", type=float, default=50, help="needles at depths up to this %% count as far")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cells = []
    for i, folder in enumerate(args.needle):
        run = json.loads((Path(folder) / "results.json").read_text())
        cells += [c for c in run["cells"] if i == 0 or c["policy"] != "full"]
    ppl = json.loads((Path(args.ppl) / "results.json").read_text())
    found, ratios = needle_points(cells, args.far), ppl_ratios(ppl, args.reference)
    rows = ["| policy | states | PPL / " + args.reference + " [95 %] | far needles found (depth <= "
            f"{args.far:g} %) | all depths |", "|---|---:|---:|---:|---:|"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = {}
    for (name, k), (f, n, fa, na) in sorted(found.items(), key=lambda x: (x[0][0], x[0][1] or 0)):
        lo, hi = wilson(f, n)
        if name == "full":
            ax.axhline(f / n, color="grey", ls="--", lw=1, label=f"full model ({f}/{n} far)")
            rows.append(f"| full | all | 1 (PPL {next(c['ppl'] for c in ppl['cells'] if c['policy'] == 'full'):.2f}) "
                        f"| {f}/{n} ({100 * f / n:.0f} % [{100 * lo:.0f}-{100 * hi:.0f}]) | {fa}/{na} |")
            continue
        r = ratios.get((name, k))
        ci = f" [{r[1]:.3f}-{r[2]:.3f}]" if r and r[1] is not None else ""
        rows.append(f"| {name} | {k} | {f'{r[0]:.3f}' if r else 'n/a'}{ci} | {f}/{n} ({100 * f / n:.0f} % "
                    f"[{100 * lo:.0f}-{100 * hi:.0f}]) | {fa}/{na} |")
        if r is None:
            continue
        m = markers.setdefault(name, "osD^v<>p*h"[len(markers) % 10])
        ax.errorbar(r[0], f / n, yerr=[[f / n - lo], [hi - f / n]],
                    xerr=None if r[1] is None else [[r[0] - r[1]], [r[2] - r[0]]], fmt=m, ms=7 if k == 256 else 5,
                    capsize=2, label=f"{name} k={k}", alpha=1 if k == 256 else 0.6)
    ax.set_xlabel(f"PPL / {args.reference}'s at the same budget (paper's table, lower is better)")
    ax.set_ylabel(f"needles found at depths <= {args.far:g} %")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Bounded policies: far memory vs perplexity (2,048-token needles)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    out = Path(args.out)
    fig.savefig(out / "frontier.png", dpi=120)
    (out / "frontier.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
