"""Policies by name: the built-in table (POLICIES), `make_policy` for every name form ("tova", "tova-decay(gamma=0.8)",
"path/to/file.py:ClassName"), policy files, and --states as typed ("256" or "[96,64,32]")."""
from __future__ import annotations

import ast
import difflib
import importlib.util
import inspect
from pathlib import Path

from ..errors import InputError
from .base import PerHead, PerLayer, Policy
from .kvpress import ExpectedAttention, KeyDiff, PyramidKV, SnapKV
from .lab import TOVADecay, TOVADecayHead, TOVAFit, TOVAMax, TOVARecent, TOVASink, TOVAValue
from .paper import H2O, TOVA, Baseline, H2OLayer, Sinks, TOVAHead, Window
from .retrieval import Retrieval, TOVAOutliers
from .surprise import Surprise

FULL = "full"  # the unbounded transformer: no policy at all (None)
POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Window, Sinks, TOVA, TOVAHead, H2O, H2OLayer, Baseline,
                        TOVADecay, TOVAMax, TOVASink, TOVARecent, SnapKV, TOVAValue,
                        TOVADecayHead, TOVAFit, PyramidKV, KeyDiff, Retrieval, ExpectedAttention, TOVAOutliers,
                        Surprise)
}


def policy_class(name: str) -> type[Policy] | None:
    """A built-in policy by its CLI name, or your own class as "path/to/file.py:ClassName" (a Policy subclass);
    None for `full`, the unbounded transformer, which has no policy."""
    if name == FULL:
        return None
    if name in POLICIES:
        return POLICIES[name]
    path, colon, cls_name = name.rpartition(":")
    if not colon or not path.endswith(".py"):
        close = difflib.get_close_matches(name, [FULL, *POLICIES], n=1)
        raise InputError(f"unknown policy {name!r}{f': did you mean {close[0]}?' if close else ''}; choose one of "
                         f"{FULL}, {', '.join(POLICIES)}, or give your own as path/to/file.py:ClassName.")
    return load_policy_file(Path(path), cls_name)


def load_policy_file(path: Path, cls_name: str) -> type[Policy]:
    if not path.is_file():
        raise InputError(f"policy file {path} does not exist; give path/to/file.py:ClassName.")
    spec = importlib.util.spec_from_file_location(f"msrnn_user_policy_{abs(hash(str(path.resolve())))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code: report where, not a traceback (or a silent exit)
        raise InputError(f"policy file {path} failed to run: {type(e).__name__}: {e}") from e
    found = [n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, Policy) and v is not Policy
             and v.__module__ == module.__name__]
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise InputError(f"policy file {path} has no {cls_name!r}; the Policy classes it defines: "
                         f"{', '.join(found) or 'none'}.")
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise InputError(f"{path}:{cls_name} is not a msrnn.policies.Policy subclass; subclass Policy and "
                         "implement priority(attn, pos, score) (see docs/policies.md).")
    return cls


def parse_spec(spec: str) -> tuple[str, dict]:
    """ "tova-decay(gamma=0.8)" -> ("tova-decay", {"gamma": 0.8}): a policy's settings written in its CLI name."""
    name, paren, args = spec.strip().partition("(")
    if not paren:
        return name, {}
    if not args.endswith(")"):
        raise InputError(f"policy {spec!r}: settings go in parentheses, e.g. tova-decay(gamma=0.8).")
    kwargs = {}
    for item in filter(None, (a.strip() for a in args[:-1].split(","))):
        key, eq, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip()) if eq else None
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = None
        if not eq or kwargs[key.strip()] is None or not key.strip().isidentifier():
            raise InputError(f"policy {spec!r}: {item!r} is not key=value with a number, e.g. gamma=0.8.")
    return name.strip(), kwargs


def make_policy(name: str, states: int | None = None, positions: str | None = None, **kwargs) -> Policy | None:
    """The policy called `name` (as the CLI spells it, settings allowed: "tova-decay(gamma=0.8)") with budget
    `states` and position scheme `positions` (None: the policy's own default); `full` gives None (unbounded).
    `states` as a list gives every layer its own budget (layer 0 first): a PerLayer of one such policy per layer;
    a list of lists gives every kv head of every layer its own ([[k_00, k_01, ...], [k_10, ...], ...], `per_head`)."""
    if positions is not None:
        kwargs["positions"] = positions
    spec, (name, settings) = name, parse_spec(name)
    cls = policy_class(name)
    if cls is None:  # full
        return None
    if states is None:
        raise InputError(f"policy {name!r} needs a budget: give states=k (e.g. --states 256).")
    if isinstance(states, (list, tuple)):  # one budget per layer: one policy per layer
        return PerLayer([_layer_policy(spec, name, k, kwargs) for k in states])
    unknown_setting(name, cls, settings)
    try:
        return cls(states, **settings, **kwargs)
    except TypeError as e:  # a setting the class does not take
        raise InputError(f"policy {name!r} does not take the settings {settings or kwargs}: {e}") from None


def unknown_setting(name: str, cls: type[Policy], settings: dict) -> None:
    """One InputError for the first setting `cls.__init__` does not take, with the closest one it does (a class
    taking **kwargs is left to itself)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    known = [p for p in params if p not in ("self", "states", "positions")]
    for key in settings:
        if key not in params or key in ("self", "states", "positions"):
            close = difflib.get_close_matches(key, known, n=1)
            listed = f"ts settings: {', '.join(known)}" if known else "t has no settings"
            hint = f": did you mean {close[0]}? I{listed}" if close else f"; i{listed}"
            raise InputError(f"policy {name!r} does not take a setting {key!r}{hint} (the budget is --states, the "
                             "position scheme --positions).")


def _layer_policy(spec: str, name: str, k, kwargs: dict) -> Policy:
    """One layer's member of make_policy's PerLayer: budget k, an int or a list of one int per kv head."""
    if isinstance(k, (list, tuple)) and k and all(isinstance(h, int) and not isinstance(h, bool) for h in k):
        policy = make_policy(spec, min(k), **kwargs)
        if type(policy).at_layer is not Policy.at_layer:
            raise InputError(f"policy {name!r} sets its own budget per layer; it cannot take budgets per kv head.")
        return PerHead(policy, k)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(f"policy {name!r}: a per-layer budget list holds whole numbers of states (or one list of "
                         f"them per layer, one per kv head), got {k!r}.")
    return make_policy(spec, k, **kwargs)  # kwargs holds positions, if given


def _whole_numbers(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(k, int) and not isinstance(k, bool) for k in value)


def parse_states(text: str) -> int | list:
    """--states as typed: "256" (every layer), "[96,64,32]" (one budget per layer, layer 0 first),
    "[[512,64,64],[64,64,512]]" (one per kv head of each layer), or a .json file holding such a list (or
    {"budgets": list}, as `msrnn calibrate` writes)."""
    text = str(text).strip()
    if text.endswith(".json"):
        return read_budgets(text)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if _whole_numbers(value) or (isinstance(value, list) and value and all(map(_whole_numbers, value))):
        return value
    raise InputError(f"--states {text!r}: give a whole number of states per layer (e.g. 256), one per layer in "
                     "brackets, layer 0 first (e.g. \"[96,64,32]\"), one per kv head of each layer "
                     "(\"[[512,64,64],[64,64,512]]\"), or a budgets .json file.")


def read_budgets(path: str | Path) -> list:
    """Budgets per layer (and per kv head) from a JSON file: a list as --states takes it, or {"budgets": list}."""
    import json

    path = Path(path)
    if not path.is_file():
        raise InputError(f"--states {path}: no such budgets file; give a .json file of budgets (msrnn calibrate "
                         "writes one) or the budgets themselves, e.g. 256.")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--states {path}: not valid JSON ({e}).") from None
    value = value.get("budgets") if isinstance(value, dict) else value
    if not (_whole_numbers(value) or (isinstance(value, list) and value and all(map(_whole_numbers, value)))):
        raise InputError(f"--states {path}: the file must hold a list of budgets per layer, or of lists per kv head "
                         "(e.g. [[512,64,64],[64,64,512]]), alone or as {\"budgets\": ...}.")
    return value
