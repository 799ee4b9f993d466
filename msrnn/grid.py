"""The grid of the evaluation commands: policies x budgets as typed (`--policies tova,h2o --states 64,[96,64,32]`),
checked before any run; a budget as a key, a column head and a point on the x axis; a cell of the results by policy
and budget."""
from __future__ import annotations

import re

from .errors import InputError
from .policies import POLICIES, layer_budgets, make_policy, parse_spec, parse_states, policy_class


def parse_grid(policies: str, states: str, positions: str | None = None,
               compare: str | None = None) -> tuple[list[str], list[int]]:
    names = [p.strip() for p in re.split(r",(?![^(]*\))", policies) if p.strip()]  # commas outside (...)
    if compare is not None and (compare == "full" or compare not in names):
        raise InputError(f"--compare {compare}: name one of the bounded policies of --policies "
                         f"({', '.join(n for n in names if n != 'full')}), written as there.")
    if not names:
        raise InputError(f"--policies: none given; choose from {', '.join(POLICIES)} or path/to/file.py:ClassName.")
    budgets = parse_budgets(states)
    for name in names:  # a policy file runs here, once everything else has been checked
        policy_class(parse_spec(name)[0])  # a clear error for an unknown name or a bad file:Class, before any run
    for name in names:  # every policy accepts every budget (clear error now, not after an hour)
        for k in budgets:
            make_policy(name, k, positions)
    return list(dict.fromkeys(names)), budgets


def parse_budgets(states: str) -> list:
    """--states of a grid as typed: "64,128", "64,[96,64,32]" (one budget per layer in brackets, layer 0 first),
    "[[512,64],[64,512]]" (one per kv head of each layer) or a budgets .json file -> the distinct budgets, smallest
    mean first: ints, or tuples of per-layer budgets (of per-head tuples) (`budget_key`)."""
    items, depth, start, text = [], 0, 0, str(states)
    for i, c in enumerate(text + ","):  # commas outside [...], at any depth of brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items = [s for s in items if s.strip()]
    try:
        budgets = [budget_key(parse_states(s)) for s in items]  # 256, or (96, 64, 32): one per layer
    except InputError:
        raise InputError(f"--states {states!r}: give comma-separated integers, e.g. 64,128,256,512, budgets per "
                         "layer in brackets, layer 0 first, e.g. 64,[96,64,32], per kv head, e.g. [[512,64],[64,512]], "
                         "or a budgets .json file.") from None
    if not budgets or min(min(_flat(k)) if isinstance(k, tuple) else k for k in budgets) < 1:
        raise InputError(f"--states {states!r}: give positive budgets, e.g. 64,128,256,512.")
    return sorted(set(budgets), key=lambda k: (mean_budget(k), str(k)))


def budget_key(k):
    """A budget as a grid key: an int, None (full), or a tuple of per-layer budgets, each an int or a tuple of
    per-head budgets (lists in JSON)."""
    return tuple(budget_key(x) for x in k) if isinstance(k, (list, tuple)) else k


def _flat(k) -> list[int]:
    return [x for layer in k for x in (layer if isinstance(layer, tuple) else (layer,))]


def mean_budget(k) -> float:
    """The mean budget per layer (and kv head): where a per-layer budget sits on the x axis (PyramidKV's k is its
    mean); a per-head budget's mean counts every head once."""
    return sum(_flat(k)) / len(_flat(k)) if isinstance(k, tuple) else k


def budget_label(k) -> str:
    """A budget as the table's column head: 256, [96,64,32] for one per layer, "heads~256" (the mean) per kv head."""
    if isinstance(k, tuple) and any(isinstance(x, tuple) for x in k):
        return f"heads~{mean_budget(k):g}"
    return "[" + ",".join(map(str, k)) + "]" if isinstance(k, tuple) else str(k)


def check_layers(names: list[str], budgets: list, layers: int, positions: str | None = None) -> None:
    """Budgets per layer of the grid against the model's depth: one clear error before any run."""
    bounded = [name for name in names if name != "full"]
    for k in budgets:
        if isinstance(k, tuple) and bounded:  # PerLayer.at_layer says what is wrong (the count is the policy's)
            layer_budgets(make_policy(bounded[0], list(k), positions), layers)


def find_cell(cells: list[dict], name: str, k: int | None) -> dict:
    return next(c for c in cells if c["policy"] == name and c["states"] in (k, None))
