"""`alignkit merge` end to end on tiny models: every method's checkpoint against the hand
computation (to 1e-6), the sweep's files, LoRA inputs, and one-line errors for mismatched
models (architecture, a shape, a tokenizer) and for flags the method does not use."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.cli import main
from alignkit.testing import build_tiny_model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny Llama models of one tokenizer: a, b, c (2 layers, seeds 0-2), p, f1, f2 (3 layers)."""
    root = tmp_path_factory.mktemp("zoo")
    dirs = {name: build_tiny_model(root / name, seed=seed) for seed, name in enumerate("abc")}
    for seed, name in enumerate(("p", "f1", "f2")):
        dirs[name] = build_tiny_model(root / name, seed=10 + seed, num_layers=3)
    return {name: str(path) for name, path in dirs.items()}


def weights(directory):
    return load_file(f"{directory}/model.safetensors")


def merge(*args):
    return main(["merge", *map(str, args)])


def assert_state(out_dir, expected):
    """The saved checkpoint holds exactly `expected` (name -> tensor), to 1e-6."""
    got = weights(out_dir)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert_close(got[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_interpolate_is_exact_and_loads_with_transformers(zoo, tmp_path):
    out = tmp_path / "out"
    assert merge("--method", "interpolate", "--base", zoo["a"], "--models", zoo["b"], "--alpha", 0.3,
                 "--output", out) == 0
    a, b = weights(zoo["a"]), weights(zoo["b"])
    assert_state(out, {n: 0.3 * a[n] + 0.7 * b[n] for n in a})
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size
    record = json.loads((out / "merge.json").read_text())
    assert record["method"] == "interpolate" and record["alpha"] == 0.3
    assert [i["source"] for i in record["inputs"]] == [zoo["a"], zoo["b"]]


def test_sweep_writes_one_checkpoint_per_alpha_and_a_manifest(zoo, tmp_path):
    out = tmp_path / "sweep"
    assert merge("--method", "interpolate", "--base", zoo["a"], "--models", zoo["b"], "--sweep", "0:1:0.5",
                 "--output", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["alpha"], c["path"]) for c in manifest["checkpoints"]] == [
        (0.0, "alpha_0.00"), (0.5, "alpha_0.50"), (1.0, "alpha_1.00")]
    a, b = weights(zoo["a"]), weights(zoo["b"])
    assert_state(out / "alpha_1.00", a)
    assert_state(out / "alpha_0.00", b)
    assert_state(out / "alpha_0.50", {n: 0.5 * a[n] + 0.5 * b[n] for n in a})
    assert json.loads((out / "alpha_0.50" / "merge.json").read_text())["alpha"] == 0.5


def test_soup_and_task_arithmetic_are_exact(zoo, tmp_path):
    a, b, c = (weights(zoo[k]) for k in "abc")
    assert merge("--method", "soup", "--models", zoo["a"], zoo["b"], zoo["c"], "--output", tmp_path / "soup") == 0
    assert_state(tmp_path / "soup", {n: (a[n] + b[n] + c[n]) / 3 for n in a})
    assert merge("--method", "task_arithmetic", "--base", zoo["a"], "--models", f"{zoo['b']},{zoo['c']}",
                 "--lambdas", "0.5,-0.25", "--output", tmp_path / "ta") == 0
    assert_state(tmp_path / "ta", {n: a[n] + 0.5 * (b[n] - a[n]) - 0.25 * (c[n] - a[n]) for n in a})


def lines_scale(name, alpha, beta, blocks=3):
    """The addendum's LiNeS scale: α + β·b/(L−1) inside block b, α elsewhere."""
    if name.startswith("model.layers."):
        return alpha + beta * int(name.split(".")[2]) / (blocks - 1)
    return alpha


def test_lines_single_task_scales_each_layer(zoo, tmp_path):
    """α = 0.2, β = 1 − α = 0.8 on 3 blocks: 0.2, 0.6, 1.0; embeddings, final norm, head 0.2"""
    assert merge("--method", "lines", "--base", zoo["p"], "--models", zoo["f1"], "--alpha", 0.2,
                 "--output", tmp_path / "lines") == 0
    pre, ft = weights(zoo["p"]), weights(zoo["f1"])
    assert sorted({round(lines_scale(n, 0.2, 0.8), 6) for n in pre}) == [0.2, 0.6, 1.0]
    assert_state(tmp_path / "lines", {n: pre[n] + lines_scale(n, 0.2, 0.8) * (ft[n] - pre[n]) for n in pre})
    record = json.loads((tmp_path / "lines" / "merge.json").read_text())
    assert record["block_scales"] == pytest.approx([0.2, 0.6, 1.0]) and record["form"] == "single-task"


def test_lines_multi_task_fixes_alpha_at_one_over_t(zoo, tmp_path):
    """T = 2, τ_MTL = τ1 + τ2: α = 1/2; β = 0.5 -> blocks 0.5, 0.75, 1.0"""
    assert merge("--method", "lines", "--base", zoo["p"], "--models", zoo["f1"], zoo["f2"], "--beta", 0.5,
                 "--output", tmp_path / "mtl") == 0
    pre, f1, f2 = (weights(zoo[k]) for k in ("p", "f1", "f2"))
    expected = {n: pre[n] + lines_scale(n, 0.5, 0.5) * (f1[n] + f2[n] - 2 * pre[n]) for n in pre}
    assert_state(tmp_path / "mtl", expected)
    assert json.loads((tmp_path / "mtl" / "merge.json").read_text())["alpha"] == pytest.approx(0.5)


def test_hma_given_ratios(zoo, tmp_path):
    """ratios 0.2, 0.6 on 2 layers: embeddings and layer 0 0.2, layer 1 0.6, final norm and
    head ᾱ = mean = 0.4"""
    assert merge("--method", "hma", "--base", zoo["a"], "--models", zoo["b"], "--ratios", "0.2,0.6",
                 "--output", tmp_path / "hma") == 0
    a, b = weights(zoo["a"]), weights(zoo["b"])

    def ratio(name):
        if name.startswith("model.layers."):
            return [0.2, 0.6][int(name.split(".")[2])]
        return 0.2 if name.startswith("model.embed_tokens") else 0.4

    assert ratio("lm_head.weight") == 0.4 and ratio("model.norm.weight") == 0.4
    assert_state(tmp_path / "hma", {n: ratio(n) * a[n] + (1 - ratio(n)) * b[n] for n in a})


def test_lora_adapter_is_merged_onto_its_base_first(zoo, tmp_path):
    """W_B = W + (α_lora / r) B A for each adapted layer (here α_lora / r = 2), then the
    interpolation 0.5 θ_a + 0.5 θ_B"""
    from peft import PeftModel

    from alignkit.models import apply_lora, load_model

    model, _ = load_model(zoo["a"], dtype=torch.float32, device="cpu")
    peft_model = apply_lora(model, r=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file()
    assert merge("--method", "interpolate", "--base", zoo["a"], "--models", adapter_dir, "--alpha", 0.5,
                 "--output", tmp_path / "out") == 0

    base = weights(zoo["a"])
    layer = PeftModel.from_pretrained(load_model(zoo["a"], dtype=torch.float32, device="cpu")[0], adapter_dir)
    q_proj = layer.base_model.model.model.layers[0].self_attn.q_proj
    delta = 2.0 * q_proj.lora_B["default"].weight @ q_proj.lora_A["default"].weight
    assert delta.abs().max() > 1e-3
    name = "model.layers.0.self_attn.q_proj.weight"
    assert_close(weights(tmp_path / "out")[name], base[name] + 0.5 * delta, atol=1e-6, rtol=0)
    untouched = "model.embed_tokens.weight"  # not adapted: 0.5 a + 0.5 a
    assert_close(weights(tmp_path / "out")[untouched], base[untouched], atol=1e-6, rtol=0)
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["inputs"][1]["lora"] is True


@pytest.fixture(scope="module")
def mismatched(zoo, tmp_path_factory):
    """A GPT-2 with the tiny tokenizer, a narrower Llama, and b with two token ids swapped or
    one token added."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("mismatched")
    tokenizer = AutoTokenizer.from_pretrained(zoo["a"])
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    build_tiny_model(root / "narrow", hidden_size=16)
    swapped = root / "swapped"
    shutil.copytree(zoo["b"], swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = sorted(vocab, key=vocab.get)
    first, second = by_id[100], by_id[101]  # ordinary BPE tokens: merges name strings, so ids may swap
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    extra = root / "extra"
    shutil.copytree(zoo["b"], extra)
    extended = AutoTokenizer.from_pretrained(extra)
    extended.add_tokens(["<newtoken>"])
    extended.save_pretrained(extra)
    return {"gpt2": root / "gpt2", "narrow": root / "narrow", "swapped": swapped, "extra": extra}


@pytest.mark.parametrize("which, message", [
    ("gpt2", r"--models \S+gpt2: architecture GPT2LMHeadModel \(gpt2\) differs from --base \S+'s "
             r"LlamaForCausalLM \(llama\)"),
    ("narrow", r"--models \S+narrow: parameter model.embed_tokens.weight has shape \(\d+, 16\), "
               r"--base \S+'s has \(\d+, 32\)"),
    ("swapped", r"--models \S+swapped: tokenizer differs from --base \S+'s: token '.+' is id \d+ there, "
                r"id \d+ here"),
    ("extra", r"tokenizer differs .* 1 extra token\(s\), first '<newtoken>'"),
])
def test_mismatches_are_one_line_errors(zoo, mismatched, tmp_path, capsys, which, message):
    code = merge("--method", "interpolate", "--base", zoo["a"], "--models", mismatched[which], "--alpha", 0.5,
                 "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("alignkit merge: error: ")]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "interpolate", "--alpha", "0.5", "--data", "x.jsonl"], "--data is what hma learns"),
    (["--method", "soup", "--sweep", "0:1:0.5"], "--sweep sweeps alpha of interpolate"),
    (["--method", "interpolate", "--sweep", "0:1:0.3"], "not a whole number"),
    (["--method", "interpolate", "--alpha", "0.5", "--sweep", "0:1:0.5"], "not both"),
    (["--method", "interpolate", "--alpha", "0.5", "--steps", "3"], "--steps is a setting of learning hma"),
    (["--method", "interpolate", "--alpha", "0.5", "--reward", "length:4"], "--reward scores greedy_soup"),
    (["--method", "interpolate"], "interpolate needs alpha"),
    (["--method", "greedy_soup", "--models", "A"], "greedy_soup needs --eval-data"),
    (["--method", "hma", "--ratios", "0.2,0.3", "--data", "d.jsonl"], "ratios or --data"),
    (["--method", "task_arithmetic", "--lambdas", "0.1,0.2,0.3"], "one lambda or one per model"),
])
def test_flag_errors_name_the_flag(zoo, tmp_path, capsys, extra, message):
    base = [] if "greedy_soup" in extra or "soup" in extra else ["--base", zoo["a"]]
    extra = [zoo["a"] if item == "A" else item for item in extra]
    code = merge(*extra, *base, "--models", zoo["b"], "--output", tmp_path / "out")
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_occupied_output(zoo, tmp_path, capsys):
    assert merge("--method", "soup", "--models", zoo["a"], tmp_path / "nope", "--output", tmp_path / "o") == 2
    assert "--models" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert merge("--method", "soup", "--models", zoo["a"], zoo["b"], "--output", occupied) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert merge("--method", "soup", "--models", zoo["a"], zoo["b"], "--output", occupied, "--overwrite") == 2
    assert "not a merge alignkit wrote" in capsys.readouterr().err
    assert (occupied / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_a_previous_merge(zoo, tmp_path):
    out = tmp_path / "out"
    assert merge("--method", "soup", "--models", zoo["a"], zoo["b"], "--output", out) == 0
    assert merge("--method", "soup", "--models", zoo["a"], zoo["c"], "--output", out, "--overwrite") == 0
    a, c = weights(zoo["a"]), weights(zoo["c"])
    assert_state(out, {n: (a[n] + c[n]) / 2 for n in a})


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["merge", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for method in ("interpolate", "hma", "greedy_soup", "task_arithmetic", "lines", "--sweep"):
        assert method in text


def test_lines_sweep_and_output_dtype(zoo, tmp_path):
    """A single-task lines sweep sets β = 1 − α at each point; --dtype bfloat16 writes bf16."""
    out = tmp_path / "sweep"
    assert merge("--method", "lines", "--base", zoo["p"], "--models", zoo["f1"], "--sweep", "0.5:1:0.5",
                 "--dtype", "bfloat16", "--output", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(c["alpha"], c["beta"]) for c in manifest["checkpoints"]] == [(0.5, 0.5), (1.0, 0.0)]
    pre, ft = weights(zoo["p"]), weights(zoo["f1"])
    got = weights(out / "alpha_0.50")
    assert all(tensor.dtype == torch.bfloat16 for tensor in got.values())
    for name in pre:
        expected = pre[name] + lines_scale(name, 0.5, 0.5) * (ft[name] - pre[name])
        assert_close(got[name], expected.to(torch.bfloat16))
    assert_state(out / "alpha_1.00", {n: ft[n].to(torch.bfloat16) for n in ft})  # λ = 1 everywhere
    assert json.loads((out / "alpha_1.00" / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_base_in_a_sweep_keeps_its_weights(zoo, tmp_path):
    """The adapter-merged base is the template every point is loaded into; its own weights must
    survive the sweep: α = 1 is the merged adapter, α = 0.5 the midpoint."""
    from alignkit.merge.io import load_input
    from alignkit.models import apply_lora, load_model

    model, _ = load_model(zoo["a"], dtype=torch.float32, device="cpu")
    peft_model = apply_lora(model, r=2)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "sweep"
    assert merge("--method", "interpolate", "--base", tmp_path / "adapter", "--models", zoo["b"],
                 "--sweep", "0:1:0.5", "--output", out) == 0
    merged_base = load_input(str(tmp_path / "adapter"), "adapter", keep_model=False).state
    b = weights(zoo["b"])
    assert_state(out / "alpha_1.00", merged_base)
    assert_state(out / "alpha_0.50", {n: 0.5 * merged_base[n] + 0.5 * b[n] for n in b})


def test_tied_embeddings_stay_tied(tmp_path):
    """Tied input/output embeddings are one tensor: merged once, saved tied, loaded tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from alignkit.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    dirs = []
    for seed in (0, 1):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp_path / f"t{seed}")
        tokenizer.save_pretrained(tmp_path / f"t{seed}")
        dirs.append(tmp_path / f"t{seed}")
    assert merge("--method", "interpolate", "--base", dirs[0], "--models", dirs[1], "--alpha", 0.3,
                 "--output", tmp_path / "out") == 0
    a, b = weights(dirs[0]), weights(dirs[1])
    assert_state(tmp_path / "out", {n: 0.3 * a[n] + 0.7 * b[n] for n in a})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_output_may_not_be_an_input(zoo, tmp_path, capsys):
    """Even a previous merge (which --overwrite could replace) is refused as the output of a
    merge that reads it."""
    out = tmp_path / "soup"
    assert merge("--method", "soup", "--models", zoo["a"], zoo["b"], "--output", out) == 0
    assert merge("--method", "soup", "--models", out, zoo["c"], "--output", out, "--overwrite") == 2
    assert "is one of the input models" in capsys.readouterr().err
    assert (out / "merge.json").is_file()
