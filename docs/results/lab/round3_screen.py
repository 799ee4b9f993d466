"""The lab's third round, offline: record the full model's attention on Pride and Prejudice, screen eviction scores
on it in seconds, and fit the tiny learned scorer (`tova-fit`'s constants).

    PYTHONPATH=. python docs/results/lab/round3_screen.py --text ../shared/data/pride-and-prejudice.txt --chunks 1 \
        --states 128 --layers 0,5,10,15,20,25,29          # 2.5 min; its output: round3-screen.txt

Screening. A real PPL run of one policy at one budget costs minutes; this costs a second. For every layer of the
unbounded model it replays the bounded recurrence with the *full model's* attention rows: each step the newest
query's attention, renormalised over the states the candidate still holds, feeds the candidate's score, and the
lowest priority is dropped. What is measured is the share of the full model's attention (of query t, over its
layer's heads) that falls on states already dropped: the mass the bounded model cannot see. It is exact for layer
0 (its attention does not depend on the state) and an approximation above (there the bounded model's own attention
drifts), so it only ranks ideas; PPL decides (docs/results/lab/README.md, round 3).

Fitting. Least squares on the full model's attention: log of the attention the next `horizon` queries give state
j, from log(attention now), log(bias-corrected moving average, gamma 0.9), log(value norm) and log(age + 1), over
every layer. The weights (the intercept does not change a ranking) become `TOVAFit`'s constants.
"""
from __future__ import annotations

import argparse
import math

import torch

import msrnn
from msrnn.eval import pick_chunks
from msrnn.report import read_text
from msrnn.policies import Policy

EPS = 1e-6


class Recorder(Policy):
    """Never evicts; keeps every layer's attention probabilities (B, H, T, T) as the model hands them to update."""

    name = "recorder"

    def __init__(self, states):
        super().__init__(states)
        self.attn = []

    def update(self, score, attn):
        self.attn.append(attn[0].clone())  # (H, T, T): layers arrive in order, one call each (chunk = T)
        return score

    def priority(self, attn, pos, score):
        raise AssertionError("a recorder never evicts")


def record(model, tokens):
    """[(A (H, T, T), V (Hkv, T, hd))] per layer: the unbounded model's attention and the states' values."""
    rec = Recorder(tokens.shape[1] + 1)
    state = model.init_state(1, rec)
    with torch.inference_mode():
        model.prefill(tokens, state, rec, mode="exact", chunk=tokens.shape[1])
    return [(a, layer.values[0, :, : tokens.shape[1]].float()) for a, layer in zip(rec.attn, state.layers)]


def features(A, V, gamma=0.9):
    """Per query t and state j <= t: log attention now, log bias-corrected average, log value norm, log(age+1)."""
    H, T, _ = A.shape
    a = A.mean(0)  # (T, T) head mean
    ema = torch.zeros(T, T)
    s = torch.zeros(T)
    for t in range(T):
        s = gamma * s + (1 - gamma) * a[t]
        ema[t] = s
    age = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(min=0).float()  # (T, T) age[t, j]
    ema = ema / (1 - gamma ** (age + 1))
    v = V.abs().sum(dim=-1).mean(0)[None].expand(T, T)  # L1 norm, kv-head mean
    return a, ema, v, age


def fit(layers, horizon=32, every=4, start=32):
    rows, target = [], []
    for A, V in layers:
        a, ema, v, age = features(A, V)
        T = a.shape[0]
        fut = torch.cumsum(a.flip(0), 0).flip(0)  # fut[t] = sum_{i >= t} a[i]
        for t in range(start, T - horizon, every):
            j = slice(0, t + 1)
            future = (fut[t + 1, j] - fut[t + 1 + horizon, j]) / horizon  # mean attention of the next queries
            rows.append(torch.stack([(a[t, j] + EPS).log(), (ema[t, j] + EPS).log(), v[t, j].log(),
                                     (age[t, j] + 1).log(), torch.ones(t + 1)], -1))
            target.append((future + EPS).log())
    X, y = torch.cat(rows).double(), torch.cat(target).double()
    w = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    r2 = 1 - ((X @ w - y) ** 2).mean() / y.var()
    return w, float(r2), len(y)


# candidates: (update(s, a_layer, a_heads, vnorm_heads) -> s, priority(s, a, vnorm, age) -> prio); 1-D over states
def decay_update(gamma):
    return lambda s, a, ah, vn: gamma * s + (1 - gamma) * a  # a (n) broadcast over the rows of s


def vatp_update(gamma):  # per head: attention times its kv head's value norm, averaged over heads
    def up(s, a, ah, vn):
        G = ah.shape[0] // vn.shape[0]
        w = (ah * vn.repeat_interleave(G, 0)).mean(0)
        return gamma * s + (1 - gamma) * w / w.sum()
    return up


def headmax_update(gamma):  # a moving average per kv head (DecayHeadMax of round 2)
    def up(s, a, ah, vn):
        Hkv = vn.shape[0]
        return gamma * s + (1 - gamma) * ah.view(Hkv, -1, ah.shape[-1]).mean(1)
    return up


def aged(gamma, beta):  # the bias-corrected average times (age + 1) ** beta
    return lambda s, a, vn, age: s / (1 - gamma ** (age + 1)) * (age + 1) ** beta


def sink(prio, first=1):  # the first token always stays
    def p(s, a, vn, age):
        out = prio(s, a, vn, age).clone()
        out[..., :first] = math.inf
        return out
    return p


def corrected(gamma):
    return lambda s, a, vn, age: s / (1 - gamma ** (age + 1))


def learned(w, gamma=0.9):
    def prio(s, a, vn, age):
        return (w[0] * (a + EPS).log() + w[1] * (s / (1 - gamma ** (age + 1)) + EPS).log()
                + w[2] * vn.mean(0).log() + w[3] * (age + 1).log())
    return prio


def simulate(A, V, k, update, priority, per_head=False):
    """(share of the full model's attention, head mean, that falls on dropped states; relative error of the
    attention output, ||o_bounded - o_full||^2 / ||o_full||^2, head mean), each averaged over queries. A per_head
    candidate ranks each kv head's states on its own (priority (Hkv, n)); a layer-wise one gives one ranking (its
    largest row: a per-head score becomes layer-wise by its max over heads)."""
    H, T, _ = A.shape
    Hkv = V.shape[0]
    G = H // Hkv
    Vh = V.repeat_interleave(G, 0)  # (H, T, hd) the values each query head reads
    vnorm = V.abs().sum(dim=-1)  # (Hkv, T) L1 norms, as VATP
    held = torch.zeros(Hkv, T, dtype=torch.bool)
    s = torch.zeros(Hkv, T)
    lost = err = 0.0
    for t in range(T):
        held[:, t] = True
        m = held[:, :t + 1].repeat_interleave(G, 0)  # (H, n) what each query head can see
        a_full = A[:, t, :t + 1]  # (H, n)
        lost += float((a_full * ~m).sum(-1).mean())
        ah = a_full * m
        ah = ah / ah.sum(-1, keepdim=True)
        if t % 4 == 0:  # (every 4th query: enough for a mean, and 4x cheaper)
            full = torch.bmm(a_full[:, None], Vh[:, :t + 1])[:, 0]  # (H, hd)
            bounded = torch.bmm(ah[:, None], Vh[:, :t + 1])[:, 0]
            err += 4 * float(((bounded - full).square().sum(-1) / full.square().sum(-1)).mean())
        a = ah.mean(0)
        s[:, :t + 1] = update(s[:, :t + 1], a, ah, vnorm[:, :t + 1])  # (Hkv, n): equal rows if layer-wise
        if t + 1 > k:
            age = (t - torch.arange(t + 1)).float()
            p = priority(s[:, :t + 1], a, vnorm[:, :t + 1], age).expand(Hkv, t + 1)
            if not per_head:
                p = p.amax(0, keepdim=True).expand(Hkv, t + 1)
            p = p.masked_fill(~held[:, :t + 1], math.inf)
            held[torch.arange(Hkv), p.argmin(-1)] = False
    return lost / T, err / T


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", required=True)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--states", default="64,128,256")
    ap.add_argument("--only", default="", help="screen only these candidates (names separated by ;)")
    ap.add_argument("--layers", default="0,4,8,12,16,20,24,29", help="layers to screen on (all are fitted)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # many tiny ops: threads only fight
    model, tok = msrnn.load(None)
    data, index = pick_chunks(tok.encode(read_text(args.text)), args.context, args.chunks)
    layers = [rec for chunk in data for rec in record(model, chunk[None])]
    L = model.cfg.num_hidden_layers
    w, r2, n = fit(layers)
    print(f"fit on {n} (query, state) pairs of chunks {index}: weights (log a, log avg, log |v|, log age+1, 1) = "
          f"{[round(float(x), 3) for x in w]}, R^2 = {r2:.3f}")
    # The target that matters is what j adds to the output, a_ij v_j: log(future attention * |v_j|_1). log |v_j| is
    # a feature, so its least-squares weight is the attention fit's plus one, the others unchanged.
    wc = w.clone()
    wc[2] += 1
    print("contribution target: weights (log a, log avg, log |v|, log age+1) over the average's = "
          f"{[round(float(x / wc[1]), 3) for x in wc[:4]]}")
    cands = {
        "tova": (decay_update(0.0), corrected(0.0)),
        "tova-decay(0.9)": (decay_update(0.9), corrected(0.9)),
        "tova-value(0.9)": (decay_update(0.9), sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn.mean(0))),
        "vatp-decay(0.9) sink": (vatp_update(0.9), sink(corrected(0.9))),
        "learned": (decay_update(0.9), learned(w)),
        "learned-contrib": (decay_update(0.9), sink(learned(wc))),
        "decay-age(0.9, 0.1)": (decay_update(0.9), aged(0.9, 0.1)),
        "tova-decay(0.95)": (decay_update(0.95), corrected(0.95)),
        "headmax(0.95)": (headmax_update(0.95), corrected(0.95)),
        "tova-head": (headmax_update(0.0), corrected(0.0), True),
        "decay-head(0.9)": (headmax_update(0.9), corrected(0.9), True),
        "decay-head(0.95)": (headmax_update(0.95), corrected(0.95), True),
        "value-head(0.9)": (headmax_update(0.9), sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn), True),
        "value-headmax(0.9)": (headmax_update(0.9), sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn)),
        "value-sink4(0.9)": (decay_update(0.9),
                             sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn.mean(0), 4)),
        "value^0.5(0.9)": (decay_update(0.9), sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn.mean(0) ** 0.5)),
        "value^2(0.9)": (decay_update(0.9), sink(lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn.mean(0) ** 2)),
        "value(0.95)": (decay_update(0.95), sink(lambda s, a, vn, age: corrected(0.95)(s, a, vn, age) * vn.mean(0))),
        "value-nosink(0.9)": (decay_update(0.9), lambda s, a, vn, age: corrected(0.9)(s, a, vn, age) * vn.mean(0)),
    }
    cands = {n: c for n, c in cands.items() if not args.only or n in args.only.split(";")}
    pick = [int(x) for x in args.layers.split(",")]
    for k in map(int, args.states.split(",")):
        for name, fn in cands.items():
            per = torch.tensor([[simulate(*layers[c * L + l], k, *fn) for c in range(len(data))] for l in pick])
            per = per.mean(1)  # (layers, 2): mass lost, output error
            print(f"k={k} {name:22s} mass lost {100 * per[:, 0].mean():6.2f}%  output error {100 * per[:, 1].mean():6.2f}%"
                  "  per layer " + " ".join(f"{100 * x:.1f}" for x in per[:, 1]), flush=True)


if __name__ == "__main__":
    main()
