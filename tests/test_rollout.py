"""HFEngine on a tiny random Llama: agreement with teacher forcing and with HF generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.rollout import HFEngine, Rollout, RolloutEngine, SamplingParams

# Different lengths in one batch, so left padding is exercised.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
# With a random model over ~320 tokens, stopping on 1 id in 8 ends most samples early but
# lets some run to max_new_tokens.
STOP_IDS = tuple(range(4, 320, 8))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))


def teacher_forced_logprobs(model, rollout: Rollout, pad_id: int, temperature: float = 1.0):
    """log softmax(logits / T) of each response token from one full forward, (num tokens,)."""
    input_ids, attention_mask, response_mask = rollout.to_sequences(pad_id)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1] / temperature, -1)
    logprobs = logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logprobs[response_mask[:, 1:]]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=12, seed=0, stop_token_ids=STOP_IDS),
        SamplingParams(
            max_new_tokens=12, seed=1, stop_token_ids=STOP_IDS, temperature=0.7, top_p=0.9, top_k=50
        ),
    ],
)
def test_logprobs_match_teacher_forced_forward(model, engine, tokenizer, sampling):
    rollout = engine.generate(PROMPTS, 3, sampling)
    assert rollout.response_ids.shape[0] == 9
    assert "stop" in rollout.finish_reason and "length" in rollout.finish_reason
    expected = teacher_forced_logprobs(model, rollout, tokenizer.pad_token_id, sampling.temperature)
    torch.testing.assert_close(
        rollout.response_logprobs[rollout.response_mask], expected, atol=1e-4, rtol=0
    )
    assert (rollout.response_logprobs[~rollout.response_mask] == 0).all()


def test_greedy_equals_hf_generate(model, engine, tokenizer):
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in PROMPTS)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    attention_mask = torch.arange(width) >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]
    with torch.inference_mode():
        reference = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask.long(),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )[:, width:]
    rollout = engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=10, greedy=True))
    assert torch.equal(rollout.response_ids, reference[:, : rollout.response_ids.shape[1]])
    assert torch.equal(
        engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=10, temperature=0)).response_ids,
        rollout.response_ids,
    )


def test_same_seed_same_rollout_other_seed_other_rollout(engine):
    sampling = SamplingParams(max_new_tokens=8, seed=42, stop_token_ids=STOP_IDS)
    first, second = engine.generate(PROMPTS, 2, sampling), engine.generate(PROMPTS, 2, sampling)
    assert torch.equal(first.response_ids, second.response_ids)
    assert torch.equal(first.response_logprobs, second.response_logprobs)
    other = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, seed=43))
    assert not torch.equal(first.response_ids[:, :1], other.response_ids[:, :1])


def test_samples_of_one_group_differ(engine):
    rollout = engine.generate([[5, 6, 7]], 4, SamplingParams(max_new_tokens=6, seed=0))
    assert len({tuple(row) for row in rollout.response_ids.tolist()}) == 4


def test_eos_stops_and_masks_after_it(model, tokenizer):
    plain = HFEngine(model, pad_id=tokenizer.pad_token_id)
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    tokens = plain.generate(PROMPTS, 1, greedy).response_ids[0].tolist()
    # Declare the first token that did not appear before position >= 2 to be EOS.
    stop_at = next(t for t in range(2, 10) if tokens[t] not in tokens[:t])
    eos_engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokens[stop_at],))
    rollout = eos_engine.generate(PROMPTS, 1, greedy)
    assert rollout.finish_reason[0] == "stop"
    assert rollout.lengths[0].item() == stop_at + 1
    assert rollout.response_ids[0, : stop_at + 1].tolist() == tokens[: stop_at + 1]
    assert not rollout.response_mask[0, stop_at + 1 :].any()
    assert (rollout.response_ids[0, stop_at + 1 :] == tokenizer.pad_token_id).all()
    # ignore_eos turns the engine's EOS off; a stop id in SamplingParams works the same way.
    ignored = eos_engine.generate(PROMPTS, 1, SamplingParams(10, greedy=True, ignore_eos=True))
    assert ignored.finish_reason[0] == "length"
    by_stop_id = plain.generate(
        PROMPTS, 1, SamplingParams(10, greedy=True, stop_token_ids=(tokens[stop_at],))
    )
    assert torch.equal(by_stop_id.response_mask[0], rollout.response_mask[0])


def test_max_new_tokens_gives_length(engine):
    rollout = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=5, seed=0, ignore_eos=True))
    assert rollout.finish_reason == ["length"] * 6
    assert rollout.lengths.tolist() == [5] * 6
    assert rollout.response_mask.all()


def test_top_k_1_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=8, greedy=True))
    top1 = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=8, top_k=1, seed=5))
    assert torch.equal(top1.response_ids[::2], greedy.response_ids)
    assert torch.equal(top1.response_ids[1::2], greedy.response_ids)


def test_group_index_and_prompts(engine):
    rollout = engine.generate(PROMPTS, 3, SamplingParams(max_new_tokens=3, seed=0))
    assert rollout.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rollout.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert len(rollout) == 9


@pytest.mark.parametrize(
    "options",
    [{"drop_finished": False}, {"max_batch_size": 4}, {"preallocate_cache": False}],
)
def test_batching_choices_do_not_change_results(model, engine, tokenizer, options):
    """Dropping finished rows, chunking by max_batch_size and the cache layout leave each
    sample's tokens unchanged (its noise depends only on seed, sample index and step)."""
    sampling = SamplingParams(max_new_tokens=12, seed=3, stop_token_ids=STOP_IDS)
    reference = engine.generate(PROMPTS, 3, sampling)
    assert "stop" in reference.finish_reason
    other_engine = HFEngine(
        model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,), **options
    )
    other = other_engine.generate(PROMPTS, 3, sampling)
    assert torch.equal(other.response_ids, reference.response_ids)
    assert torch.equal(other.response_mask, reference.response_mask)
    assert other.finish_reason == reference.finish_reason
    torch.testing.assert_close(other.response_logprobs, reference.response_logprobs)
    if options == {"drop_finished": False}:  # the reference decoded fewer rows
        assert reference.extras["decoded_rows"] < other.extras["decoded_rows"]


def test_to_sequences_layout(engine, tokenizer):
    rollout = engine.generate(
        PROMPTS, 1, SamplingParams(max_new_tokens=6, seed=0, stop_token_ids=STOP_IDS)
    )
    input_ids, attention_mask, response_mask = rollout.to_sequences(tokenizer.pad_token_id)
    for row, prompt in enumerate(PROMPTS):
        length = rollout.lengths[row].item()
        assert input_ids[row, : len(prompt)].tolist() == prompt
        assert torch.equal(input_ids[row, response_mask[row]], rollout.response_ids[row, :length])
        assert attention_mask[row].sum().item() == len(prompt) + length
    assert torch.equal(response_mask.sum(-1), rollout.lengths)


def test_model_mode_restored_and_protocol(model, engine):
    model.train()
    engine.generate([[5, 6]], 1, SamplingParams(max_new_tokens=2, seed=0))
    assert model.training
    model.eval()
    engine.generate([[5, 6]], 1, SamplingParams(max_new_tokens=2, seed=0))
    assert not model.training
    assert isinstance(engine, RolloutEngine)


def test_peft_wrapped_model(tiny_model_dir, tokenizer):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    engine = HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=(tokenizer.eos_token_id,))
    sampling = SamplingParams(max_new_tokens=8, seed=0, stop_token_ids=STOP_IDS)
    rollout = engine.generate(PROMPTS, 2, sampling)
    expected = teacher_forced_logprobs(model, rollout, tokenizer.pad_token_id)
    torch.testing.assert_close(
        rollout.response_logprobs[rollout.response_mask], expected, atol=1e-4, rtol=0
    )


def test_invalid_inputs_are_refused(engine):
    with pytest.raises(ValueError):
        engine.generate([[]], 1, SamplingParams())
    with pytest.raises(ValueError):
        engine.generate([[5]], 0, SamplingParams())


def test_a_shard_of_the_prompts_draws_the_samples_one_call_draws(engine):
    """Rank 1 of 2 samples prompts 2..3 of a batch of 4 with first_sample = 2 x n: the noise is
    keyed on the global sample index, so its rows are rows 4..7 of the whole batch's call (up to
    float-level logit differences from other left padding, none on this model)."""
    prompts = PROMPTS + [[18, 19, 20, 21, 22]]
    n = 2
    whole = engine.generate(prompts, n, SamplingParams(max_new_tokens=10, seed=3, stop_token_ids=STOP_IDS))
    shard = engine.generate(prompts[2:], n, SamplingParams(max_new_tokens=10, seed=3, stop_token_ids=STOP_IDS,
                                                           first_sample=2 * n))
    width = shard.response_ids.shape[1]
    assert torch.equal(shard.response_mask, whole.response_mask[4:, :width])
    assert torch.equal(shard.response_ids * shard.response_mask, whole.response_ids[4:, :width] * shard.response_mask)
    unkeyed = engine.generate(prompts[2:], n, SamplingParams(max_new_tokens=10, seed=3, stop_token_ids=STOP_IDS))
    assert not torch.equal(unkeyed.response_ids[:, :4], whole.response_ids[4:, :4])  # the offset matters
