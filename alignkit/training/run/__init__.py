"""What every training run shares, online or offline: the config (`config.py`), the algorithm
registry (`registry.py`), atomic checkpoints (`checkpoint.py`), metrics.jsonl (`metrics.py`),
the optimizer and LR schedule (`schedule.py`), seeding (`seed.py`), the result a run
returns (`result.py`), the run directory's checks, fingerprint and lock (`rundir.py`,
`fingerprint.py`) and stopping on Ctrl-C / SIGTERM (`interrupt.py`)."""
