"""Seq2seq reward modelling (Zhou et al. 2024, "Sequence to Sequence Reward Modeling: Improving
RLHF by Language Feedback", arXiv 2409.00162, AAAI 2025): the reward model is a causal LM trained
with sequence MLE instead of binary (Bradley-Terry) MLE, and its rewards are read per token.

Training (what the paper's Fig. 2 calls Correction Mapping and Identity Mapping): for a pair
(x, y_w, y_l), with src(x, y) the RM's input built from the prompt and a response,

    L = -[ sum_t log p(y_w,t | src(x, y_l), y_w,<t) + sum_t log p(y_w,t | src(x, y_w), y_w,<t) ]
        / (|y_w| + |y_w|)                                          (token mean, like SFT)

Reward extraction (Fig. 2, "Reward Extracting"): the response y is scored against what the RM
would write given src(x, y). The response is fed token by token (teacher forcing) and each
token is compared with the RM's greedy choice at that point:

    r_t = match_reward     if argmax_v p(v | src(x, y), y_<t) == y_t
    r_t = mismatch_reward  otherwise

Before the first divergence this is the paper's "positive score until it diverges from the
seq2seq RM output"; after it, "input the response token-by-token, assigning negative scores to
those diverging tokens". Pinned by the paper (abstract and Fig. 2 caption, read): sequence MLE
as the RM objective, both mappings, positive scores up to the divergence and negative scores on
diverging tokens. Not pinned by what could be read here (no official code was found): the score
magnitudes (defaults +1 / -1), the score of a token that matches again after a divergence (we
give it match_reward), and the RM's input template (ours is `alignkit.rewards.seq2seq`'s).
"""

from __future__ import annotations

from torch import Tensor


def sequence_mle(token_logps: Tensor, target_mask: Tensor) -> Tensor:
    """Token-mean sequence NLL over every target token of the batch: -sum m_t log p_t / sum m_t.

    token_logps, target_mask (B, T) -> scalar. For seq2seq RM training each pair contributes two
    rows (correction: src(x, y_l) -> y_w; identity: src(x, y_w) -> y_w).
    """
    mask = target_mask.to(token_logps.dtype)
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def divergence_token_rewards(
    predicted: Tensor,
    targets: Tensor,
    target_mask: Tensor,
    *,
    match_reward: float = 1.0,
    mismatch_reward: float = -1.0,
) -> Tensor:
    """Seq2seq RM token rewards (Zhou et al. 2024): match_reward where the RM's greedy token equals
    the response token, mismatch_reward where it diverges, 0 off the mask.

    predicted, targets (B, T) token ids, target_mask (B, T) bool -> rewards (B, T) float32.
    """
    if predicted.shape != targets.shape or targets.shape != target_mask.shape:
        raise ValueError(f"seq2seq rewards: predicted {tuple(predicted.shape)}, targets {tuple(targets.shape)} and "
                         f"target_mask {tuple(target_mask.shape)} must have one shape")
    matches = (predicted == targets).float()
    rewards = match_reward * matches + mismatch_reward * (1.0 - matches)
    return rewards * target_mask.float()
