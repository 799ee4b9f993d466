"""One picture and one table of Frankenstein's stream under every position scheme measured, from the runs' stream.json:
absolute (the 70,000-token run) and loglog (40,000) of stream-frankenstein-70k, rebase with its fresh-read control
(frankenstein-40k), all cut to 40,000 tokens, drawn by msrnn.stream.plot_stream.

    python docs/results/stream-positions/compare.py      # writes compare.png and compare.md next to this file
"""
import json
from pathlib import Path

from msrnn.stream import plot_stream, pooled

HERE = Path(__file__).parent
OLD = HERE.parent / "stream-frankenstein-70k"
SOURCES = {"tova k=512 absolute": (OLD / "stream.json", "tova k=512"),
           "tova k=512 loglog": (OLD / "loglog-40k" / "stream.json", "tova(positions='loglog') k=512"),
           "tova k=512 rebase": (HERE / "frankenstein-40k" / "stream.json", "tova k=512 rebase")}
new = json.loads((HERE / "frankenstein-40k" / "stream.json").read_text())
runs = {label: [r for r in json.loads(path.read_text())["runs"][key] if r["start"] <= 39001]
        for label, (path, key) in SOURCES.items()}
res = {**new, "labels": list(runs), "runs": runs,
       "title": "frankenstein.txt: TOVA k=512, one stream of 40,000 tokens per position scheme"}
plot_stream(res, HERE / "compare.png")
starts = {c["start"] for c in new["control"]}
fresh = pooled(new["control"])
lines = [f"| scheme | PPL tokens 8,001–35,000 | PPL {min(starts)}–{new['control'][-1]['end']} in the stream | "
         "fresh (control) | stream / fresh |", "|---|---:|---:|---:|---:|"]
for label, rows in runs.items():
    mid = pooled([r for r in rows if 8001 <= r["start"] <= 34001])
    late = pooled([r for r in rows if r["start"] in starts])
    lines.append(f"| {label.split()[-1]} | {mid:.2f} | {late:.2f} | {fresh:.2f} | {late / fresh:.3f} |")
(HERE / "compare.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
