"""`--ref-model merge:...`: the online loop and the offline trainers build the merged reference
in memory through `alignkit.merge.resolve_model_spec`; a bad spec fails before anything loads."""

import json

import pytest
from torch.testing import assert_close

import alignkit
from alignkit.cli import main
from alignkit.merge import resolve_model_and_tokenizer, resolve_model_spec
from alignkit.testing import build_tiny_model, synthetic_pairs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return str(build_tiny_model(root / "a", seed=0)), str(build_tiny_model(root / "b", seed=1))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resolve_model_spec_builds_the_merge_in_memory(pair):
    a, b = pair
    merged = resolve_model_spec(f"merge:interpolate:{a},{b}:0.25", device="cpu")
    plain_a, plain_b = resolve_model_spec(a, device="cpu"), resolve_model_spec(b, device="cpu")
    theirs_a, theirs_b = plain_a.state_dict(), plain_b.state_dict()
    for name, tensor in merged.state_dict().items():
        assert_close(tensor, 0.25 * theirs_a[name] + 0.75 * theirs_b[name], atol=1e-6, rtol=0)
    _, tokenizer = resolve_model_and_tokenizer(f"merge:soup:{a},{b}", device="cpu")
    assert tokenizer.eos_token == "<|im_end|>"


def test_online_run_takes_a_merged_reference(pair, tmp_path, capsys):
    """grpo, 2 steps from policy a. Reference a: KL 0 at step 1 (policy = reference); reference
    0.5 a + 0.5 b: KL > 0 from step 1."""
    a, b = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Write a short review.", "The movie"] * 2))
    runs = {}
    for name, ref in (("plain", a), ("merged", f"merge:interpolate:{a},{b}:0.5")):
        code = main(["train", "grpo", "--model", a, "--data", str(prompts), "--output", str(tmp_path / name),
                     "--ref-model", ref, "--reward", "length:4", "--batch-size", "2", "--max-steps", "2",
                     "--lr", "1e-2", "--set", "group_size=2", "--set", "max_new_tokens=6", "--set", "beta=0.1",
                     "--allow-degenerate", "--no-progress"])
        assert code == 0, capsys.readouterr().err
        runs[name] = read_metrics(tmp_path / name)
    assert [row["step"] for row in runs["merged"]] == [1, 2]
    assert runs["plain"][0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert runs["merged"][0]["kl"] > 1e-3


def test_offline_run_takes_a_merged_reference(pair, tmp_path):
    """dpo, 1 step from policy a: with reference a the implicit rewards start at 0; with the
    soup of a and b they do not."""
    a, b = pair
    rows = synthetic_pairs(4)
    chosen = {}
    for name, ref in (("plain", None), ("merged", f"merge:soup:{a},{b}")):
        alignkit.train("dpo", model=a, data=rows, output_dir=tmp_path / name, ref_model=ref, batch_size=4,
                       max_steps=1, progress=False)
        chosen[name] = read_metrics(tmp_path / name)[0]["rewards/chosen"]
    assert chosen["plain"] == pytest.approx(0.0, abs=1e-6)
    assert abs(chosen["merged"]) > 1e-3


def test_a_bad_merge_spec_fails_before_loading(pair, tmp_path, capsys):
    a, _ = pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    for spec, message in ((f"merge:interpolate:{a},{tmp_path / 'nope'}:0.5", "--ref-model"),
                          (f"merge:interpolate:{a},{a}", "needs alpha"),
                          (f"merge:greedy_soup:{a},{a}", "needs data")):
        code = main(["train", "grpo", "--model", a, "--data", str(prompts), "--output", str(tmp_path / "run"),
                     "--ref-model", spec, "--reward", "length:4", "--max-steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err


def test_reference_cache_key_follows_the_recipe_and_the_input_weights(tmp_path):
    """The offline reference-log-prob cache is keyed on the merged reference: it changes with
    the recipe and with an input's weights, and is stable otherwise."""
    from alignkit.training.offline.reference_cache import reference_digest
    from alignkit.training.run.config import TrainConfig

    a = build_tiny_model(tmp_path / "a", seed=0)
    b = build_tiny_model(tmp_path / "b", seed=1)

    def digest(spec):
        return reference_digest(TrainConfig(ref_model=spec), None)

    spec = f"merge:interpolate:{a},{b}:0.5"
    first = digest(spec)
    assert first.startswith("merge:") and digest(spec) == first
    assert digest(f"merge:interpolate:{a},{b}:0.4") != first
    build_tiny_model(b, seed=2)
    assert digest(spec) != first


def test_relative_paths_in_a_spec_are_absolute_whatever_the_cwd(tmp_path, monkeypatch):
    """Parsed in tmp/work: ./a and ckpt/b (ckpt/ exists there) become tmp/work/a, tmp/work/ckpt/b;
    a hub id and the alias stay. The shipped spec, parsed again from another directory, names
    the same models."""
    from alignkit.merge.spec import absolute_model_spec, parse_model_spec

    work = tmp_path / "work"
    (work / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(work)
    recipe = parse_model_spec("merge:interpolate:./a,ckpt/b:0.3")
    assert recipe.base == str(work / "a") and recipe.models == [str(work / "ckpt" / "b")]
    assert parse_model_spec("merge:soup:org/name,smollm2-135m").models == ["org/name", "smollm2-135m"]
    shipped = absolute_model_spec("merge:interpolate:./a,ckpt/b:0.3")
    assert shipped == f"merge:interpolate:{work / 'a'},{work / 'ckpt' / 'b'}:0.3"
    monkeypatch.chdir(tmp_path)
    again = parse_model_spec(shipped)
    assert (again.base, again.models, again.alpha) == (str(work / "a"), [str(work / "ckpt" / "b")], 0.3)


def test_a_recipe_files_paths_read_against_its_directory(tmp_path, monkeypatch):
    """recipes/r.yaml names base ../models/a and models [b]: they resolve under recipes/, not under
    the working directory; the shipped spec is the recipe's absolute path."""
    from alignkit.merge.spec import absolute_model_spec, parse_model_spec

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("method: interpolate\nbase: ../models/a\nmodels: [b]\nalpha: 0.4\n")
    (tmp_path / "recipes" / "b").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_model_spec("merge:recipes/r.yaml") == f"merge:{tmp_path / 'recipes' / 'r.yaml'}"
    monkeypatch.chdir(elsewhere)
    recipe = parse_model_spec(f"merge:{tmp_path / 'recipes' / 'r.yaml'}")
    assert recipe.base == str(tmp_path / "models" / "a") and recipe.models == [str(tmp_path / "recipes" / "b")]
    monkeypatch.chdir(tmp_path / "recipes")
    assert parse_model_spec("merge:r.yaml").base == str(tmp_path / "models" / "a")


def test_the_ray_shipped_config_carries_an_absolute_merge_spec(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from alignkit.training.cluster.launch import shipped_config

    monkeypatch.chdir(tmp_path)
    config = SimpleNamespace(ref_model="merge:soup:./a,./b", output="out")
    assert shipped_config(config).ref_model == f"merge:soup:{tmp_path / 'a'},{tmp_path / 'b'}"
    assert config.ref_model == "merge:soup:./a,./b"
