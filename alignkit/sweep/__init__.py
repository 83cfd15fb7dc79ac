"""`alignkit sweep`: hyper-parameter search with Optuna over a training recipe, tuned on some
seeds and tested on disjoint others (see `alignkit.sweep.runner`). Needs `pip install
alignkit[tune]` (optuna)."""
