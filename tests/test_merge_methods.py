"""alignkit.merge: the maths of every method on hand-sized tensors, the HMA block split and
ratio parameterisation, LiNeS's per-layer scales, greedy soup's acceptance rule, and merge
spec strings / recipes."""

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.merge import methods
from alignkit.merge.spec import MergeRecipe, parse_model_spec, validate_recipe


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_interpolate_worked_example():
    """α = 0.25: 0.25·1 + 0.75·3 = 2.5 ; 0.25·2 + 0.75·(−2) = −1.0"""
    out = methods.interpolate({"w": t(1.0, 2.0)}, {"w": t(3.0, -2.0)}, 0.25)
    assert_close(out["w"], t(2.5, -1.0))


def test_interpolate_endpoints_are_the_models():
    a, b = {"w": t(1.0, 2.0)}, {"w": t(3.0, -2.0)}
    assert_close(methods.interpolate(a, b, 1.0)["w"], a["w"])  # α weights the base
    assert_close(methods.interpolate(a, b, 0.0)["w"], b["w"])


def test_soups_worked_examples():
    """uniform: (1 + 2 + 6) / 3 = 3 ; weighted: 0.25·1 + 0.75·3 = 2.5"""
    assert_close(methods.uniform_soup([{"w": t(1.0)}, {"w": t(2.0)}, {"w": t(6.0)}])["w"], t(3.0))
    assert_close(methods.weighted_average([{"w": t(1.0)}, {"w": t(3.0)}], [0.25, 0.75])["w"], t(2.5))


def test_task_arithmetic_worked_example():
    """τ1 = [1, 0], τ2 = [0, 2]; θ = [1, 1] + 0.5 τ1 + 2 τ2 = [1.5, 5]"""
    pre = {"w": t(1.0, 1.0)}
    out = methods.task_arithmetic(pre, [{"w": t(2.0, 1.0)}, {"w": t(1.0, 3.0)}], [0.5, 2.0])
    assert_close(out["w"], t(1.5, 5.0))


def test_inputs_are_not_modified():
    a, b = {"w": t(1.0)}, {"w": t(3.0)}
    methods.interpolate(a, b, 0.5)
    methods.task_arithmetic(a, [b], [2.0])
    assert a["w"].item() == 1.0 and b["w"].item() == 3.0


LAYER_OF = {"embed": None, "layers.0.w": 0, "layers.1.w": 1, "layers.2.w": 2, "norm": None, "head": None}


def test_lines_scales_follow_the_addendum():
    """L = 3, α = 0.2, β = 0.8: blocks 0.2, 0.2 + 0.8·1/2 = 0.6, 1.0; outside the blocks α = 0.2"""
    scales = methods.lines_scales(LAYER_OF, 3, 0.2, 0.8)
    assert scales == pytest.approx({"embed": 0.2, "layers.0.w": 0.2, "layers.1.w": 0.6, "layers.2.w": 1.0,
                                    "norm": 0.2, "head": 0.2})


def test_lines_edit_worked_example():
    """θ = θ_pre + λ τ: middle block 1 + 0.6·2 = 2.2, embedding 1 + 0.2·2 = 1.4"""
    pre = {name: t(1.0) for name in LAYER_OF}
    tau = {name: t(2.0) for name in LAYER_OF}
    out = methods.lines(pre, tau, LAYER_OF, 3, 0.2, 0.8)
    assert_close(out["layers.1.w"], t(2.2))
    assert_close(out["embed"], t(1.4))
    assert_close(out["layers.2.w"], t(3.0))  # α + β = 1: the last block keeps the whole update


def test_lines_refuses_a_single_block():
    with pytest.raises(ValueError, match="at least 2"):
        methods.lines_scales({"layers.0.w": 0}, 1, 0.5, 0.5)


def test_lines_multi_task_alpha():
    """τ_MTL = Σ τ_i: α = 1/T = 0.5. A trimmed τ_MTL = [2, 0] (‖·‖₁ = 2) against Σ τ = [2, 2]
    (‖·‖₁ = 4): α = 4/2 · 1/2 = 1.0"""
    taus = [{"w": t(1.0, -1.0)}, {"w": t(1.0, 3.0)}]
    summed = {"w": t(2.0, 2.0)}
    assert methods.lines_multi_task_alpha(taus, summed) == pytest.approx(0.5)
    assert methods.lines_multi_task_alpha(taus, {"w": t(2.0, 0.0)}) == pytest.approx(1.0)


def test_layer_blocks_equal_split_as_the_reference_block3():
    """26 layers, K = 3: size 8, layers 0-7 | 8-15 | 16-25 (the reference's 8/16 pivots)"""
    assert methods.layer_blocks(26, 3) == [0] * 8 + [1] * 8 + [2] * 10


def test_layer_blocks_pivots_as_the_reference_split():
    """'10#20' on 32 layers: 0-10 | 11-20 | 21-31 (layer > pivot moves to the next block)"""
    assert methods.layer_blocks(32, pivots=[10, 20]) == [0] * 11 + [1] * 10 + [2] * 11


@pytest.mark.parametrize("kwargs", [{"num_blocks": 5}, {"num_blocks": 0}, {"pivots": [2, 1]}, {"pivots": [3]}])
def test_layer_blocks_refuses_bad_splits(kwargs):
    with pytest.raises(ValueError):
        methods.layer_blocks(4, **kwargs)


def test_hma_groups_embeddings_first_block_head_mean_ratio():
    names = ["embed", "layers.0.w", "layers.1.w", "norm", "head"]
    layer_of = {"embed": None, "layers.0.w": 0, "layers.1.w": 1, "norm": None, "head": None}
    groups = methods.hma_groups(names, layer_of, [0, 1])
    assert groups == {"embed": 0, "layers.0.w": 0, "layers.1.w": 1, "norm": None, "head": None}


def test_hma_ratios_worked_example():
    """ᾱ = 0.4, K = 2, s = [0, ln 3]: σ = [0.5, 0.75], Σ = 1.25 -> α = 0.8·[0.4, 0.6] = [0.32, 0.48];
    ε = 0.25: weights [0.75, 1.0], Σ = 1.75 -> 0.8·[3/7, 4/7]"""
    scores = t(0.0, math.log(3.0))
    assert_close(methods.hma_ratios(scores, 0.4), t(0.32, 0.48))
    assert_close(methods.hma_ratios(scores, 0.4, epsilon=0.25), t(0.8 * 3 / 7, 0.8 * 4 / 7))


def test_hma_ratios_keep_the_mean_and_its_gradient_is_zero():
    torch.manual_seed(0)
    scores = torch.randn(5, requires_grad=True)
    ratios = methods.hma_ratios(scores, 0.3, epsilon=0.1)
    assert ratios.mean().item() == pytest.approx(0.3, abs=1e-7)
    ratios.mean().backward()
    assert_close(scores.grad, torch.zeros(5), atol=1e-7, rtol=0)


def test_initial_scores_give_the_mean_ratio():
    scores = methods.initial_scores(3, 0.2)
    assert scores[0].item() == pytest.approx(math.log(0.25))
    assert_close(methods.hma_ratios(scores, 0.2), t(0.2, 0.2, 0.2))


def test_hma_merge_worked_example():
    """A = 1, B = 0: each parameter takes its group's α; the head takes ᾱ = 0.4"""
    a = {"embed": t(1.0), "layers.1.w": t(1.0), "head": t(1.0)}
    b = {name: t(0.0) for name in a}
    out = methods.hma_merge(a, b, {"embed": 0, "layers.1.w": 1, "head": None}, [0.2, 0.6], 0.4)
    assert_close(out["embed"], t(0.2))
    assert_close(out["layers.1.w"], t(0.6))
    assert_close(out["head"], t(0.4))


def test_greedy_soup_rejects_the_model_that_lowers_the_score():
    """score = −(θ − 2)²: own scores −1, −0.25, −64 -> order [2.5], [1], [10]. Soup [2.5]: −0.25;
    with [1]: mean 1.75 scores −0.0625 >= −0.25, kept; with [10]: mean 4.5 scores −6.25, rejected."""
    states = [{"w": t(1.0)}, {"w": t(2.5)}, {"w": t(10.0)}]
    soup, decisions, own = methods.greedy_soup(states, ["a", "b", "c"], lambda s: -float((s["w"] - 2.0) ** 2))
    assert own == pytest.approx([-1.0, -0.25, -64.0])
    assert [d.name for d in decisions] == ["b", "a", "c"]
    assert [d.accepted for d in decisions] == [True, True, False]
    assert decisions[1].candidate_score == pytest.approx(-0.0625)
    assert decisions[2].candidate_score == pytest.approx(-6.25)
    assert decisions[2].soup_score == pytest.approx(-0.0625)
    assert_close(soup["w"], t(1.75))


def test_greedy_soup_keeps_a_model_that_leaves_the_score_unchanged():
    """>=: a copy of the best model averages to the same soup, same score -> kept"""
    states = [{"w": t(2.0)}, {"w": t(2.0)}]
    _, decisions, _ = methods.greedy_soup(states, ["a", "b"], lambda s: -float((s["w"] - 2.0) ** 2))
    assert [d.accepted for d in decisions] == [True, True]


# --------------------------------------------------------------------------- specs


def test_spec_interpolate():
    recipe = parse_model_spec("merge:interpolate:runs/a,runs/b:0.3")
    assert (recipe.method, recipe.base, recipe.models, recipe.alpha) == ("interpolate", "runs/a", ["runs/b"], 0.3)


def test_spec_named_fields_and_hma_defaults():
    recipe = parse_model_spec("merge:hma:a,b:ratios=0.2,0.3,0.4:pivots=10,20")
    assert recipe.ratios == [0.2, 0.3, 0.4] and recipe.pivots == [10, 20]
    assert recipe.alpha == pytest.approx(0.3)  # the mean of the ratios


def test_spec_soup_and_task_arithmetic_and_lines():
    assert parse_model_spec("merge:soup:a,b,c").models == ["a", "b", "c"]
    recipe = parse_model_spec("merge:task_arithmetic:pre,a,b:0.5")
    assert (recipe.base, recipe.models, recipe.lambdas) == ("pre", ["a", "b"], [0.5])
    assert parse_model_spec("merge:lines:pre,a,b:beta=0.5").beta == 0.5


@pytest.mark.parametrize("spec, message", [
    ("merge:interpolate:a,b", "needs alpha"),
    ("merge:interpolate:a,b:0.5:beta=1", "does not use beta"),
    ("merge:soup:a", "at least 2"),
    ("merge:foo:a,b", "unknown merge method"),
    ("merge:lines:pre,a,b:0.5", "multi-task lines fixes"),
    ("merge:lines:pre,a,b", "needs beta"),
    ("merge:task_arithmetic:pre,a,b:0.1,0.2,0.3", "one lambda or one per model"),
    ("merge:hma:a,b:0.2,0.3:pivots=1,2", "3 blocks but 2 ratios"),
    ("merge:interpolate:a,b:alpha=x", "must be a number"),
    ("merge:interpolate:a,b:gamma=1", "unknown merge coefficient"),
    ("merge:interpolate", "expected merge:METHOD"),
])
def test_spec_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_model_spec(spec)


def test_yaml_recipe(tmp_path):
    recipe_file = tmp_path / "ref.yaml"
    recipe_file.write_text("method: task_arithmetic\nbase: pre\nmodels: [a, b]\nlambdas: [0.3, 0.6]\n")
    recipe = parse_model_spec(f"merge:{recipe_file}")
    assert (recipe.base, recipe.models, recipe.lambdas) == ("pre", ["a", "b"], [0.3, 0.6])
    recipe_file.write_text("method: soup\nmodels: [a, b]\nweights: [1, 2]\n")
    with pytest.raises(ValueError, match="unknown key 'weights'"):
        parse_model_spec(f"merge:{recipe_file}")


def test_soup_refuses_a_base():
    with pytest.raises(ValueError, match="takes no base"):
        validate_recipe(MergeRecipe("soup", ["a", "b"], base="c"))
