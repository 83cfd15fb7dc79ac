"""Model-space methods: interpolation, HMA, soups, task arithmetic and LiNeS (ALGORITHMS.md §4).

- `alignkit.merge.methods`: the maths, pure functions over state dicts;
- `alignkit.merge.io`: loading (LoRA adapters merged onto their base), compatibility checks,
  writing a from_pretrained checkpoint;
- `alignkit.merge.spec`: `MergeRecipe`, spec strings (`merge:interpolate:A,B:0.5`) and
  `resolve_model_spec(spec) -> nn.Module`, which builds a merge in memory wherever a model is
  loaded by name (`--ref-model merge:...`);
- `alignkit.merge.command`: the `alignkit merge` verb (greedy soup and learned HMA included).
"""

from alignkit.merge.spec import (
    METHODS,
    MergeRecipe,
    is_merge_spec,
    parse_model_spec,
    resolve_model_and_tokenizer,
    resolve_model_spec,
)

__all__ = [
    "METHODS",
    "MergeRecipe",
    "is_merge_spec",
    "parse_model_spec",
    "resolve_model_and_tokenizer",
    "resolve_model_spec",
]
