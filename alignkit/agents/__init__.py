"""Multi-turn rollouts: conversations with tools and environments (issue 15).

A rollout may be a conversation: the policy speaks, a tool or an environment answers, and so
on until the environment says done, `max_turns` or the token budget. Token ids stay the unit:
the whole conversation is one token sequence built with the tokenizer's chat template, and
only the policy's own tokens are trained on (`Rollout.env_mask` marks the others).

- `protocol.py`  the environment protocol (`reset(row)`, `step(messages)`) and `load_env`
- `adapters.py`  `--env textarena:GAME`, `verifiers:TASKSET`, `gymnasium:ENV_ID`, `trl:module:Class` (packages users
                 already have; `adapter_textarena.py`, `adapter_verifiers.py`)
- `tools.py`     plain Python functions as tools: schemas, parsing calls, running them
- `template.py`  the token ids of a templated conversation, turn by turn, with the policy mask
- `episodes.py`  many conversations advanced together on a rollout engine
- `hindsight.py` RLHS (Liang et al. 2025): a reward that simulates a response's consequences
                 before a judge scores them; `hindsight_config.py` its YAML settings
- `reward_specs.py` `load_reward`: alignkit.rewards' specs plus `rlhs:CONFIG.yaml`
"""
