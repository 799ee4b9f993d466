"""The lab's second round: variants of `tova-decay`, tried as a user's policy file and not adopted.

Run them like any built-in policy (settings in parentheses work too):

    msrnn eval ppl --text ../shared/data/pride-and-prejudice.txt --context 1024 --chunks 2 --states 64,128,256 \
      --policies "full,tova-decay,docs/results/lab/candidates.py:DecayHeadMax(gamma=0.95)"

Results and the reason none replaced `tova-decay`: docs/results/lab/README.md, section 3. Checked by hand in
tests/test_lab.py."""
import torch

from msrnn.policies import TOVADecay, TOVADecayHead, newest, INF


class DecayHeadMax(TOVADecayHead):
    """A moving average per kv head, s_hj <- gamma s_hj + (1 - gamma) a_hj (a_hj: the attention of kv head h's
    query heads to state j, averaged: `tova-decay-head`'s update); the layer keeps a state while *any* kv head
    still wants it: priority_j = max_h s_hj / (1 - gamma ** age_j)."""

    name = "decay-headmax"

    def priority(self, attn, pos, score):
        return self.bias_corrected(pos, score).amax(dim=1, keepdim=True)  # (B, Hkv, n) -> (B, 1, n)


class DecayQMax(TOVADecay):
    """The moving average of the *largest* attention any query head of the layer gives the state (TOVA averages
    over heads, so a state that one head needs can be outvoted): s_j <- gamma s_j + (1 - gamma) max_h a_hj."""

    name = "decay-qmax"

    def update(self, score, attn):
        s = score[:, :1]  # (B, 1, n)
        for a in attn.amax(dim=1).unbind(dim=1):  # (B, n) each: the max over query heads of one new query
            s = torch.lerp(a[:, None], s, self.gamma)
        return s


class DecayRecent(TOVADecay):
    """`tova-decay` that never drops the k // 8 newest states (the recent window of tova-recent)."""

    name = "decay-recent"

    def priority(self, attn, pos, score):
        pos1 = pos[:, :1]
        return super().priority(attn, pos, score).masked_fill(pos1 > newest(pos1) - self.states // 8, INF)
