"""What every training run shares, online or offline: the config (`config.py`), the algorithm
registry (`registry.py`), atomic checkpoints (`checkpoint.py`), metrics.jsonl (`metrics.py`),
the optimizer and LR schedule (`schedule.py`), seeding (`seed.py`) and the result a run
returns (`result.py`)."""
