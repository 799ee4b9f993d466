"""The statistics of the evaluation commands: a percentile bootstrap over chunks (`bootstrap_ppl`), two policies
paired over the same chunks (`paired`: the PPL ratio and the share of a gap closed), and the Wilson interval of a
success rate (`wilson`, for exact-match accuracy)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .grid import find_cell


def bootstrap_ppl(chunk_loss: Sequence[float], chunk_tokens: Sequence[int], draws: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of PPL = exp(sum loss / sum tokens) over chunks: draw as many chunks as
    there are, with replacement, `draws` times (seeded: the same numbers every run). Chunks, not tokens, are the
    unit: tokens of one chunk share its text and are far from independent."""
    ppl = _resampled_ppl(chunk_loss, chunk_tokens, _chunk_draws(len(chunk_loss), draws, seed))
    return float(ppl.quantile(0.025)), float(ppl.quantile(0.975))


def _chunk_draws(chunks: int, draws: int, seed: int) -> torch.Tensor:
    """(draws, chunks) chunk indices drawn with replacement, seeded: the same numbers every run."""
    return torch.randint(0, chunks, (draws, chunks), generator=torch.Generator().manual_seed(seed))


def _resampled_ppl(chunk_loss: Sequence[float], chunk_tokens: Sequence[int], pick: torch.Tensor) -> torch.Tensor:
    """(draws,) PPL of each draw of chunks: exp(sum loss / sum tokens) over the chunks it picked."""
    loss = torch.tensor(chunk_loss, dtype=torch.float64)
    tokens = torch.tensor(chunk_tokens, dtype=torch.float64)
    return (loss[pick].sum(-1) / tokens[pick].sum(-1)).exp()


def paired(cells: list[dict], names: list[str], budgets: list[int], against: str, draws: int = 2000,
           seed: int = 0) -> list[dict]:
    """Each policy against `against` at the same budget, over the same chunks: the PPL ratio and the share of
    `against`'s gap to the full model that the policy closes, (PPL_against - PPL) / (PPL_against - PPL_full), each
    with a paired bootstrap 95 % interval (one draw of chunks serves all three PPLs). Per-cell intervals are wide
    because chunks differ (some text is harder for every policy); paired over the same chunks, that shared part
    cancels, which is what tells two policies apart."""
    full = find_cell(cells, "full", None)
    rows = []
    for name in names:
        for k in budgets:
            a, b = find_cell(cells, name, k), find_cell(cells, against, k)
            if name in ("full", against) or not all("chunk_loss" in c for c in (a, b, full)):
                continue
            pick = _chunk_draws(len(a["chunk_loss"]), draws, seed)  # one draw of chunks for all three
            ppl = [_resampled_ppl(c["chunk_loss"], c["chunk_tokens"], pick) for c in (a, b, full)]
            ratio, closed = ppl[0] / ppl[1], (ppl[1] - ppl[0]) / (ppl[1] - ppl[2])
            point = (a["ppl"] / b["ppl"], (b["ppl"] - a["ppl"]) / (b["ppl"] - full["ppl"]))
            rows.append({"policy": name, "states": k, "against": against, "ratio": point[0],
                         "ratio_low": float(ratio.quantile(0.025)), "ratio_high": float(ratio.quantile(0.975)),
                         "gap_closed": point[1], "gap_closed_low": float(closed.nan_to_num().quantile(0.025)),
                         "gap_closed_high": float(closed.nan_to_num().quantile(0.975))})
    return rows


def wilson(correct: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % for z = 1.96) of a success rate: unlike p +- z sqrt(p(1-p)/n) it stays inside
    [0, 1] and is not empty at 0/n or n/n, the usual outcomes of small cells."""
    if trials == 0:
        return 0.0, 1.0
    p, z2 = correct / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends (rounding aside)
    high = 1.0 if correct == trials else min(1.0, centre + half)
    return low, high
