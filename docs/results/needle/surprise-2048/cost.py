"""Decode step cost of surprise against TOVA at 256 states, from position 2,000 of Frankenstein (eager, one thread,
5 alternating rounds of 20 steps; the median round). python docs/results/needle/surprise-2048/cost.py"""
import time, torch, msrnn
from msrnn.policies import make_policy
torch.set_num_threads(1)
model, tok = msrnn.load(dtype="auto")
ids = torch.tensor([tok.encode(open("../shared/data/frankenstein.txt").read()[:40000])[:2000]])
pols = {n: make_policy(n, 256) for n in ("tova", "surprise")}
states = {n: model.prefill(ids, None, p)[1] for n, p in pols.items()}
times = {n: [] for n in pols}
tokn = torch.tensor([42])
for r in range(5):
    for n, p in pols.items():
        s = states[n]
        t0 = time.perf_counter()
        for _ in range(20):
            model.step(tokn, s, p)
        times[n].append((time.perf_counter() - t0) / 20 * 1000)
for n, t in times.items():
    print(n, "ms/step median", round(sorted(t)[2], 2), [round(x, 1) for x in t])
print("ratio", sorted(times["surprise"])[2] / sorted(times["tova"])[2])
