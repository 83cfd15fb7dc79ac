"""alignkit: align language models with feedback.

    import alignkit
    result = alignkit.train("dpo", model="smollm2-135m", data="pairs.jsonl", output_dir="runs/dpo")
"""

__version__ = "0.1.0"


def train(algorithm, **kwargs):
    """Train a registered algorithm; see `alignkit.api.train`."""
    from alignkit.api import train as _train

    return _train(algorithm, **kwargs)
