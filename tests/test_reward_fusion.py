"""RewardFusion (Shen et al. 2023): weights, neighbour selection and de-duplication by hand, the
`rm:DIR,fusion_index=...` spec, and `alignkit eval-rm --fusion-index` on a tiny reward model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from run_helpers import read_metrics, write_jsonl

from alignkit.cli import main
from alignkit.eval.embeddings import MiniLMEmbedder
from alignkit.rewards import load_reward
from alignkit.rewards.fusion import (
    RewardFusion,
    fusion_text,
    fusion_weights,
    parse_fusion_options,
    select_neighbours,
)
from alignkit.testing import synthetic_consistency, synthetic_pairs


class TableEmbedder:
    """Unit vectors looked up by text (unknown texts get an orthogonal axis)."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str]) -> torch.Tensor:
        rows = [torch.tensor(self.vectors.get(text, [0.0, 0.0, 1.0])) for text in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


class TableReward:
    """Scores looked up by response; counts the rows it was asked to score."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores, self.rows_scored = scores, 0

    def __call__(self, prompts, completions, **columns):
        self.rows_scored += len(completions)
        return [self.scores[c] for c in completions]


def unit(cosine: float) -> list[float]:
    """A unit vector at the given cosine from (1, 0, 0)."""
    return [cosine, (1 - cosine**2) ** 0.5, 0.0]


def test_fusion_weights_worked_example():
    """(1, 0.95, 0.9) / 2.85 = (0.350877, 0.333333, 0.315789); no neighbours -> weight 1."""
    torch.testing.assert_close(torch.tensor(fusion_weights([0.95, 0.9])),
                               torch.tensor([1 / 2.85, 0.95 / 2.85, 0.9 / 2.85]))
    assert fusion_weights([]) == [1.0]


def test_select_neighbours_caps_thresholds_and_excludes():
    similarities = torch.tensor([0.95, 0.89, 1.0, 0.9, 0.97, 0.97])
    # >= 0.9, most similar first, equal similarities by index, index 2 (the query) excluded
    assert [i for i, _ in select_neighbours(similarities, 5, 0.9, exclude=2)] == [4, 5, 0, 3]
    assert [i for i, _ in select_neighbours(similarities, 2, 0.9)] == [2, 4]
    assert select_neighbours(similarities, 5, 0.99, exclude=2) == []


def test_reward_fusion_worked_example_dedupes_and_caches():
    """Query (q, a) scores 2; index neighbours b (cos 0.95, score 0) and c (cos 0.9, score 4);
    d is at cos 0.8 (below 0.9, unused); b appears twice in the index (counted once).
    r_fused = (1*2 + 0.95*0 + 0.9*4) / 2.85 = 5.6 / 2.85 = 1.964912."""
    texts = {fusion_text("q", r): r for r in "abcd"}
    vectors = {text: unit({"a": 1.0, "b": 0.95, "c": 0.9, "d": 0.8}[r]) for text, r in texts.items()}
    reward = TableReward({"a": 2.0, "b": 0.0, "c": 4.0, "d": -9.0})
    index = [{"prompt": "q", "chosen": r, "rejected": "x"} for r in "bbcd"]
    fused = RewardFusion(reward, index, embedder=TableEmbedder(vectors))
    assert len(fused.index_texts) == 3  # b once
    score = fused(["q"], ["a"])
    torch.testing.assert_close(score, torch.tensor([5.6 / 2.85]))
    assert fused.neighbour_counts == [2] and reward.rows_scored == 1 + 2
    fused(["q"], ["a"])
    assert reward.rows_scored == 3 + 1  # neighbour scores were cached; only the query re-scored


def test_reward_fusion_does_not_count_the_query_twice():
    """The query (q, b) is itself an index text: only c (cos 0.95 to b here) joins it.
    r_fused = (1*0 + 0.95*4) / 1.95 = 1.948718."""
    vectors = {fusion_text("q", "b"): [1.0, 0.0, 0.0], fusion_text("q", "c"): unit(0.95)}
    reward = TableReward({"b": 0.0, "c": 4.0})
    fused = RewardFusion(reward, [{"prompt": "q", "chosen": r} for r in "bc"], embedder=TableEmbedder(vectors))
    torch.testing.assert_close(fused(["q"], ["b"]), torch.tensor([3.8 / 1.95]))


def test_fusion_spec_errors_are_one_line(tmp_path):
    assert parse_fusion_options("s", "fusion_index=t.jsonl,fusion_k=3,fusion_min_sim=0.8") == {
        "fusion_index": "t.jsonl", "fusion_k": 3, "fusion_min_sim": 0.8}
    with pytest.raises(ValueError, match="fusion_k must be int, got 'x'"):
        parse_fusion_options("s", "fusion_index=t.jsonl,fusion_k=x")
    with pytest.raises(ValueError, match="option 'k=3' is not one of fusion_index=..."):
        parse_fusion_options("s", "fusion_index=t.jsonl,k=3")
    with pytest.raises(ValueError, match="need fusion_index=TRAIN.jsonl"):
        load_reward(f"rm:{tmp_path},fusion_k=3")
    with pytest.raises(ValueError, match="fusion_k must be >= 1"):
        RewardFusion(TableReward({}), [{"prompt": "q", "chosen": "a"}], k=0, embedder=TableEmbedder({}))
    with pytest.raises(ValueError, match=r"idx.jsonl, row 2: a fusion index row needs 'prompt' and 'chosen'"):
        RewardFusion(TableReward({}), [{"prompt": "q", "chosen": "a"}, {"text": "b"}], embedder=TableEmbedder({}),
                     source="idx.jsonl")


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a (seeded, random) scalar score head, saved as a reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    path = tmp_path_factory.mktemp("tiny-rm")
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_eval_rm_reports_fusion_beside_plain_scores(tiny_rm_dir, tmp_path):
    """Consistency rows (I1, I2, R1, R2) and an index of near-copies of (I1, R2): the fused
    numbers eval-rm writes equal a plain loop over the RM's scores and MiniLM similarities."""
    contrast = synthetic_consistency(8, seed=5)
    index_rows = [{"prompt": row["I1"], "chosen": row["R2"] + "!", "rejected": row["R1"]} for row in contrast]
    index_rows += synthetic_pairs(8, seed=6)
    contrast_file = write_jsonl(tmp_path / "contrast.jsonl", contrast)
    index_file = write_jsonl(tmp_path / "index.jsonl", index_rows)
    out = tmp_path / "results.json"
    assert main(["eval-rm", "--model", str(tiny_rm_dir), "--consistency", contrast_file, "--fusion-index",
                 index_file, "--fusion-k", "2", "--output", str(out), "--n-bootstrap", "50"]) == 0
    results = json.loads(out.read_text())

    scorer = load_reward(str(tiny_rm_dir))
    embedder = MiniLMEmbedder()
    unique = list(dict.fromkeys(fusion_text(r["prompt"], r["chosen"]) for r in index_rows))
    prompts = {fusion_text(r["prompt"], r["chosen"]): (r["prompt"], r["chosen"]) for r in index_rows}
    index_scores = scorer([prompts[t][0] for t in unique], [prompts[t][1] for t in unique]).double().numpy()
    index_embeddings = embedder.encode(unique).double().numpy()

    def fused(instructions, responses):
        own = scorer(instructions, responses).double().numpy()
        queries = embedder.encode([fusion_text(i, r) for i, r in zip(instructions, responses, strict=True)]).double().numpy()
        values, counts = [], []
        for b, similarities in enumerate(queries @ index_embeddings.T):
            keep = [j for j in np.argsort(-similarities, kind="stable") if similarities[j] >= 0.9][:2]
            weights = np.array([1.0, *similarities[keep]])
            values.append((weights * np.array([own[b], *index_scores[keep]])).sum() / weights.sum())
            counts.append(len(keep))
        return np.array(values), own, counts

    i1, i2, r1, r2 = ([row[key] for row in contrast] for key in ("I1", "I2", "R1", "R2"))
    fused_own, plain_own, own_counts = fused(i1, r1)
    fused_other_response, plain_other_response, other_counts = fused(i1, r2)
    fused_other_instruction, plain_other_instruction, _ = fused(i2, r1)
    assert sum(other_counts) > 0  # the near-copies were retrieved: fusion did something
    side = results["fusion"]["side_by_side"]
    assert side["response_consistency"]["plain"] == results["consistency"]["response_consistency"] == pytest.approx(
        np.mean(plain_own > plain_other_response))
    assert side["response_consistency"]["fused"] == pytest.approx(np.mean(fused_own > fused_other_response))
    assert side["instruction_consistency"]["fused"] == pytest.approx(np.mean(fused_own > fused_other_instruction))
    assert results["fusion"]["index_rows"] == len(unique) and results["fusion"]["k"] == 2
    spec_reward = load_reward(f"rm:{tiny_rm_dir},fusion_index={index_file},fusion_k=2")
    assert isinstance(spec_reward, RewardFusion)
    np.testing.assert_allclose(spec_reward(i1, r2).double().numpy(), fused_other_response, rtol=1e-5)


def test_eval_rm_fusion_bad_flags(tiny_rm_dir, tmp_path, capsys):
    contrast = write_jsonl(tmp_path / "contrast.jsonl", synthetic_consistency(2))
    base = ["eval-rm", "--model", str(tiny_rm_dir), "--consistency", contrast]
    assert main([*base, "--fusion-index", str(tmp_path / "missing.jsonl")]) != 0
    assert "--fusion-index" in capsys.readouterr().err
    bad_index = write_jsonl(tmp_path / "index.jsonl", [{"prompt": "p", "chosen": "a"}, {"prompt": "p"}])
    no_model = ["eval-rm", "--model", str(tmp_path / "no-rm"), "--consistency", contrast]  # fails before the model
    assert main([*no_model, "--fusion-index", bad_index]) == 2
    assert "index.jsonl, row 2: a fusion index row needs 'prompt' and 'chosen'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--fusion-index", contrast, "--fusion-min-sim", "2"])
    assert "--fusion-min-sim is a cosine similarity in [-1, 1], got 2.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--fusion-k", "3"])
    assert "--fusion-k and --fusion-min-sim tune --fusion-index" in capsys.readouterr().err


def test_grpo_trains_on_a_fused_reward_spec(tiny_model_dir, tiny_rm_dir, tmp_path):
    """The online loop takes `--reward rm:DIR,fusion_index=...` like any reward spec."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in ("Tell me", "The movie", "Hi", "Say")])
    index = write_jsonl(tmp_path / "index.jsonl", synthetic_pairs(6, seed=1))
    out = tmp_path / "grpo"
    assert main(["train", "grpo", "--model", str(tiny_model_dir), "--data", data, "--output", str(out),
                 "--reward", f"rm:{tiny_rm_dir},fusion_index={index},fusion_min_sim=0.5", "--batch-size", "2",
                 "--max-steps", "2", "--set", "group_size=2", "--set", "max_new_tokens=4", "--no-progress"]) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["reward/mean"]) for row in rows)


def test_fusion_raises_consistency_of_a_noisy_reward_on_a_planted_set():
    """A reward = true score (good 1, bad 0) + N(0, 1) noise fixed per text is inconsistent:
    C_res = P(1 + e1 > e2) = Phi(1 / sqrt 2) ~ 0.76. Each (I1, R) has 5 index neighbours (cos
    ~0.95, same true score); fusing 6 scores with ~equal weights cuts the noise variance ~6x:
    C_res ~ Phi(sqrt 3) ~ 0.96. Measured on these 80 planted items: 0.775 -> 0.95."""
    from alignkit.eval.reward_eval import reward_consistency

    generator = torch.Generator().manual_seed(0)
    vectors, true_scores, index, items = {}, {}, [], []
    for item in range(80):
        prompt = f"instruction {item}"
        for kind, truth in (("good", 1.0), ("bad", 0.0)):
            base = torch.randn(64, generator=generator)
            for variant in range(6):  # variant 0 is the evaluated response, 1..5 its index neighbours
                response = f"{kind} {item} v{variant}"
                noise = 0.0 if variant == 0 else 0.3
                vector = base + noise * torch.randn(64, generator=generator) * base.norm() / 8
                vectors[fusion_text(prompt, response)] = vector.tolist()
                true_scores[response] = truth + float(torch.randn(1, generator=generator))
                if variant:
                    index.append({"prompt": prompt, "chosen": response})
        items.append({"I1": prompt, "I2": f"instruction {item}?", "R1": f"good {item} v0", "R2": f"bad {item} v0"})
    for row in items:  # (I2, R1) is scored too (for C_ins): embed it like (I1, R1)
        vectors[fusion_text(row["I2"], row["R1"])] = vectors[fusion_text(row["I1"], row["R1"])]

    def noisy_reward(prompts, completions, **columns):
        return [true_scores[c] for c in completions]

    plain = reward_consistency(noisy_reward, items, n_bootstrap=10)["response_consistency"]
    fused_reward = RewardFusion(noisy_reward, index, embedder=TableEmbedder(vectors))
    fused = reward_consistency(fused_reward, items, n_bootstrap=10)["response_consistency"]
    assert sum(fused_reward.neighbour_counts) == 5 * len(fused_reward.neighbour_counts)  # every row fused with 5
    assert plain < 0.85 and fused > plain + 0.1, (plain, fused)
