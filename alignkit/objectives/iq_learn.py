"""IQ-Learn for language (Wulfmeier et al. 2024, "Imitating Language via Scalable Inverse
Reinforcement Learning", arXiv 2409.01369): inverse soft-Q learning on SFT data, read as MLE
plus a temporal-difference regulariser.

The LM's logits are the soft Q values of a token-level MDP (state s_t = prompt + y_<t, action
a_t = y_t, s_{t+1} = s_t + y_t; the last response token ends the episode):

    Q(s_t, a)  = logits_t[a]
    V(s_t)     = tau * logsumexp_a(Q(s_t, a) / tau)          pi = softmax(Q / tau)
    r_t        = Q(s_t, a_t) - gamma * V(s_{t+1})            V(terminal) = 0   (implicit reward)

IQ-Learn's offline objective with the chi^2 divergence, on expert (dataset) states only
(Garg et al. 2021; official code Div99/IQ-Learn `iq_learn/iq.py::iq_loss` with
`method.loss = "value_expert"` and `method.div = "chi"`):

    L = -E[r_t] + E[V(s_t) - gamma V(s_{t+1})] + 1/(4 alpha) E[r_t^2]

The first two terms telescope per transition to -E[Q(s_t, a_t) - V(s_t)] = -tau E[log pi(a_t|s_t)],
which is why the paper calls the method a TD-regularised extension of MLE. Divided by tau, with
lambda = 1/(4 alpha tau), the per-token loss implemented here is

    l_t = -log pi(a_t | s_t) + lambda * (Q(s_t, a_t) - gamma V(s_{t+1}))^2

lambda = 0 is exactly the SFT token NLL (the limit the paper's Fig. 8 labels "MLE
(lambda = 0.0)"); the regulariser acts on the logits' free per-state offset (the value level)
that MLE leaves unconstrained, tying each state's value to the next one's along the data.

What was checked and where: the chi^2 term 1/(4 alpha) * mean(r^2) with r = Q - gamma (1 - done)
V(s'), and the value term mean(V(s) - gamma (1 - done) V(s')) on expert states, against the official
`iq_loss` (read); "TD-regularised MLE", lambda as the regulariser weight with lambda = 0 = MLE,
and alpha as the online-data mix-in (not used here: this is the offline variant) against the
paper's abstract and figure captions. The paper's own equation numbering for the language form
could not be read in the sources available here, so no equation number is claimed for it.
Deviations: no target network (V(s_{t+1}) carries gradients, as `iq_loss` does when
`agent.use_target` is off); every sequence's last scored token is treated as terminal (a
response cut by max_length is then treated as if it ended there); the online mix-in of policy
samples is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_state_values(state_values: Tensor, response_mask: Tensor) -> Tensor:
    """V(s_{t+1}) aligned to token t: state_values shifted left by one; 0 where token t + 1 is
    not a scored response token (the episode ended) and where token t is not scored. (B, T) -> (B, T)."""
    mask = response_mask.to(state_values.dtype)
    shifted = torch.zeros_like(state_values)
    shifted[:, :-1] = state_values[:, 1:] * mask[:, 1:] * mask[:, :-1]
    return shifted


def iq_learn_token_losses(
    taken_q: Tensor,
    state_values: Tensor,
    response_mask: Tensor,
    *,
    lambda_: float = 0.1,
    gamma: float = 1.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """IQ-Learn (Wulfmeier et al. 2024): -log pi(a_t|s_t) + lambda (Q(s_t,a_t) - gamma V(s_{t+1}))^2.

    Shapes: `taken_q` (B, T) = Q(s_t, a_t), the logit of token t under the state that predicts
    it; `state_values` (B, T) = V(s_t) = tau logsumexp(logits_t / tau); `response_mask` (B, T)
    bool, the scored tokens of each row (one contiguous run). Returns (per-token loss, implicit
    reward r_t), both (B, T) and 0 off the mask. See the module docstring for the derivation.
    """
    if taken_q.shape != state_values.shape or taken_q.shape != response_mask.shape:
        raise ValueError(f"iq_learn: taken_q {tuple(taken_q.shape)}, state_values {tuple(state_values.shape)} "
                         f"and response_mask {tuple(response_mask.shape)} must have one shape")
    if temperature <= 0:
        raise ValueError(f"iq_learn: temperature must be > 0, got {temperature}")
    mask = response_mask.to(taken_q.dtype)
    log_pi = (taken_q - state_values) / temperature
    rewards = (taken_q - gamma * next_state_values(state_values, response_mask)) * mask
    return (-log_pi + lambda_ * rewards.square()) * mask, rewards
