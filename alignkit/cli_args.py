"""Argument checks shared by the argparse verbs (eval-rm, algorithms): every check runs before
a model or a data file is loaded, and fails as one line naming the flag."""

from __future__ import annotations

from pathlib import Path

from alignkit.lab.argtypes import (  # noqa: F401  (re-exported for the verbs)
    DATA_SUFFIXES,
    check_data_source,
    int_at_least,
    non_negative_int,
    positive_int,
    prepare_output_file,
)


def check_no_arguments_but(argv: list[str], allowed: tuple[str, ...], verb: str) -> None:
    """A verb without options other than `allowed` refuses anything else (a typo is not ignored)."""
    unknown = [arg for arg in argv if arg not in allowed]
    if unknown:
        raise ValueError(f"unrecognized argument(s) {' '.join(unknown)}; alignkit {verb} takes "
                         f"{' '.join(allowed) or 'no arguments'}")


def check_reward_model_source(source: str) -> None:
    """--model of eval-rm: a plain sequence-classifier directory (or hub id) is checked like any
    model; the directories of ensembles, BRME, ArmoRM and embedding RMs must exist (their own
    loaders check the files they hold)."""
    from alignkit.models.loading import check_model_source
    from alignkit.models.sources import looks_like_path, missing_path_error

    path = Path(source).expanduser()
    if path.is_dir() and any((path / f"{marker}.json").is_file() for marker in SPECIAL_REWARD_MODELS):
        return
    if not path.exists() and looks_like_path(source):
        raise missing_path_error(source, "--model")
    check_model_source(source, "--model")


SPECIAL_REWARD_MODELS = ("ensemble", "embedding_rm", "multi_objective", "brme", "preference_model", "segment_rm",
                         "principles_rm", "vpl_rm",
                         "seq2seq_rm")
"""Marker files of reward-model directories that are not one plain sequence classifier."""
