"""Policies: what turns the unbounded multi-state into a bounded one. One module per family, every name here:

    base.py     the contract (`Policy`: priority, update, the flags the model reads), the checks of a policy's
                answer, the helpers every family uses (per_kv_head, newest), PerLayer and PerHead (a budget per
                layer, per kv head)
    paper.py    the paper's: window, sinks, tova, tova-head, h2o, h2o-layer, baseline
    lab.py      the policy lab's TOVA variants: tova-decay, tova-max, tova-sink, tova-recent, tova-value,
                tova-decay-head, tova-fit
    kvpress.py  later papers, as kvpress has them: snapkv, pyramidkv, keydiff, expected-attention
    retrieval.py  memory beyond recency: retrieval heads with a large share of the memory, the rest sinks + recent
    surprise.py   memory beyond recency: keep the episodes that surprised the model (msrnn/surprise.py measures it)
    names.py    POLICIES (name -> class), make_policy and parse_spec (every name form), policy files, parse_states

The contract is written out in base.py's docstring and in docs/policies.md.
"""
from .base import (CONTRACT_FLAGS, INF, POSITION_SCHEMES, PerHead, PerLayer, Policy, built_in, check_policy,
                   check_priority, check_score, layer_budgets, nan_error, newest, per_kv_head, take_flags, whole)
from .kvpress import ExpectedAttention, KeyDiff, PyramidKV, SnapKV, pyramid
from .lab import TOVADecay, TOVADecayHead, TOVAFit, TOVAMax, TOVARecent, TOVASink, TOVAValue, value_size
from .names import (FULL, POLICIES, load_policy_file, make_policy, parse_spec, parse_states, policy_class,
                    read_budgets, unknown_setting)
from .paper import H2O, TOVA, Baseline, H2OLayer, Sinks, TOVAHead, Window
from .retrieval import HeadMix, Retrieval, TOVAOutliers, head_budgets, read_calibration
from .surprise import Surprise

