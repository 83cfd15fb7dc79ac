"""Generation engines: prompt token ids in -> response token ids, log-probs and masks out.

Engines know nothing of tokenizers or rewards. `HFEngine` samples in process from any
transformers causal LM with a hand-written KV-cache decode loop; other engines (vLLM)
implement the same `RolloutEngine` protocol.
"""

from alignkit.rollout.hf_engine import HFEngine
from alignkit.rollout.types import Rollout, RolloutEngine, SamplingParams

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "SamplingParams"]
