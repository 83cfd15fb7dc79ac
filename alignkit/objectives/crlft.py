"""C-RLFT, OpenChat's conditioned RL fine-tuning (Wang et al. 2023, "OpenChat: Advancing
Open-source Language Models with Mixed-Quality Data"; ALGORITHMS.md §3.10).

Each example comes from a data source c (e.g. GPT-4 = expert, GPT-3.5 = sub-optimal) with a
coarse reward r_c (1.0 and 0.1 in the paper). The policy is conditioned on c through its prompt
template, and the KL-regularised RL objective reduces to reward-weighted regression:

    J(theta) = E_{(x, y, c) ~ D} [ r_c * log pi_theta(y | x, c) ]

OpenChat's tokenizer gives every response token the weight r_c (`ochat/config/
conversation_template.py`, token-level weighting by default). Per example this is

    loss_b = r_{c_b} * sum_t -log pi_theta(y_t | x, c, y_<t)      (B,)

and the trainer divides the batch sum by the number of response tokens (a constant, so the
gradient stays proportional to r_c). At inference the expert template is used.
"""

from __future__ import annotations

from torch import Tensor


def crlft(token_logps: Tensor, response_mask: Tensor, class_rewards: Tensor) -> Tensor:
    """C-RLFT (Wang et al. 2023): r_c * sum_t -log pi(y_t | x, c, y_<t).

    token_logps (B, T) (0 off the response), response_mask (B, T) bool, class_rewards (B,)
    -> per-example weighted NLL (B,).
    """
    return class_rewards * (-(token_logps * response_mask).sum(-1))
