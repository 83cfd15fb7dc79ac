"""The offline loop and what it trains:

- `loop.py`          the loop, `run_offline` (SFT, reward models, every preference loss)
- `tasks.py`         the task interface, SFT, reward model, the pairwise family; `make_task`
- `pairwise_options.py`  options of the pairwise family (live reference, WPO, LD-DPO, ...)
- `reference.py`, `reference_values.py`  reference log-probs and values, computed once and cached
- `alol.py`, `listwise.py`, `pointwise.py`, `treg.py`, `unpaired.py`  further task families
- `reward.py`, `reward_frozen.py`, `reward_runners.py`  reward-model tasks and their own loops
"""
