"""Data layer: load datasets, detect and validate their format, tokenise, collate, batch.

Typical use (the trainer does this):

table = load_rows("prefs.jsonl")              # rows + (file, row) origins
kind = detect_kind(table)                     # "pairwise"
validate_rows(table, kind)                    # DataError("prefs.jsonl, row 7: ...")
examples, stats = tokenize_pairwise(table, tokenizer, max_length=512)
batches = length_bucketed_batches([e.length for e in examples], 8, seed=0, epoch=0)
batch = collate_pairs([examples[i] for i in batches[0]], tokenizer.pad_token_id)
"""

from alignkit.data.batching import length_bucketed_batches, padding_efficiency
from alignkit.data.collate import collate_pairs, collate_sequences, pad_left
from alignkit.data.errors import DataError
from alignkit.data.formats import (
    EXPECTED_COLUMNS,
    KINDS,
    detect_kind,
    is_conversational,
    rating_columns,
    split_implicit_prompt,
    validate_rows,
)
from alignkit.data.hh import DATA_FORMATS
from alignkit.data.loading import builtin_prompts, load_rows
from alignkit.data.splits import EVAL_SPLITS
from alignkit.data.table import RowTable
from alignkit.data.tokenize import (
    PairExample,
    RankedExample,
    SeqExample,
    TruncationStats,
    render_prompt_and_responses,
    tokenize_pairwise,
    tokenize_prompts,
    tokenize_ranked,
    tokenize_sft,
)

__all__ = [
    "DATA_FORMATS",
    "EVAL_SPLITS",
    "EXPECTED_COLUMNS",
    "KINDS",
    "DataError",
    "PairExample",
    "RankedExample",
    "RowTable",
    "SeqExample",
    "TruncationStats",
    "builtin_prompts",
    "collate_pairs",
    "collate_sequences",
    "detect_kind",
    "is_conversational",
    "length_bucketed_batches",
    "load_rows",
    "pad_left",
    "padding_efficiency",
    "rating_columns",
    "render_prompt_and_responses",
    "split_implicit_prompt",
    "tokenize_pairwise",
    "tokenize_prompts",
    "tokenize_ranked",
    "tokenize_sft",
    "validate_rows",
]
