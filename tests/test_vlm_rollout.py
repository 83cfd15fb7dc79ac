"""The rollout engine with pixel inputs on the prompt (tiny Qwen2-VL and LLaVA): greedy decoding
equals transformers' generate, the vision tower runs once per prompt (not once per sample), the
engine's log-probs equal the teacher-forced forward the trainer, reference and critic use, and
image placeholder tokens can be kept out of the samples."""

from __future__ import annotations

import pytest
import torch

from alignkit.data.image_tokenize import prompt_model_inputs
from alignkit.models import load_vlm
from alignkit.rollout import HFEngine, SamplingParams
from alignkit.rollout.sampling import sample_next_tokens
from alignkit.testing_vlm import build_tiny_vlm, draw_shape_image
from alignkit.training.online.images import placeholder_token_ids
from alignkit.training.online.roles import SequenceBatch, ValueModel, response_logps

ARCHS = ("qwen2_vl", "llava")
QUESTIONS = ("Which shape?", "Is the shape in the picture a square or a triangle?", "Shape?")


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, tmp_path_factory):
    path = build_tiny_vlm(tmp_path_factory.mktemp(request.param), request.param)
    model, processor = load_vlm(str(path), device="cpu")
    return request.param, model.eval(), processor


def image_prompts(processor, shapes=("square", "triangle", "circle"), questions=QUESTIONS):
    """One prompt per shape, by default questions of different lengths (so the engine left-pads)."""
    tokenizer = processor.tokenizer
    ids, inputs = [], []
    for shape, question in zip(shapes, questions, strict=False):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt, model_inputs = prompt_model_inputs(processor, text, [draw_shape_image(shape, "blue", (6, 10, 50, 46))])
        ids.append(prompt)
        inputs.append(model_inputs)
    return ids, inputs


def engine_for(model, processor, **kwargs) -> HFEngine:
    tokenizer = processor.tokenizer
    return HFEngine(model, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id], **kwargs)


def hf_greedy(model, processor, prompt: list[int], inputs: dict, max_new_tokens: int) -> list[int]:
    """transformers' own greedy decode of one unpadded prompt with its pixel inputs."""
    tokenizer = processor.tokenizer
    kwargs = {key: value.unsqueeze(0) if key == "mm_token_type_ids" else value for key, value in inputs.items()}
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    generated = out[0, len(prompt):].tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id) + 1]
    return generated


def test_greedy_generation_with_images_equals_hf_generate(vlm):
    """Three prompts of different lengths in one left-padded chunk, two samples each: every
    sample's tokens equal `model.generate(do_sample=False)` on that prompt alone (Qwen2-VL:
    3-D M-RoPE positions for the prompt, index + delta for each generated token)."""
    arch, model, processor = vlm
    prompts, inputs = image_prompts(processor)
    assert len({len(p) for p in prompts}) == 3
    rollout = engine_for(model, processor).generate(prompts, 2, SamplingParams(max_new_tokens=10, greedy=True),
                                                    prompt_inputs=inputs)
    for row in range(len(rollout)):
        prompt = row // 2
        mine = rollout.response_ids[row, : rollout.lengths[row]].tolist()
        assert mine == hf_greedy(model, processor, prompts[prompt], inputs[prompt], 10), (arch, row)
    assert rollout.prompt_inputs[0] is inputs[0] and rollout.prompt_inputs[5] is inputs[2]  # shared, not copied


def vision_module(model):
    body = model.model
    return body.visual if hasattr(body, "visual") else body.vision_tower


def test_the_vision_tower_runs_once_per_prompt_not_per_sample(vlm):
    """3 prompts x 4 samples: the tower sees each prompt's image exactly once (the prefill), and
    no decode forward carries pixels; the 4 samples share the image features in the KV cache."""
    arch, model, processor = vlm
    prompts, inputs = image_prompts(processor)
    seen = []
    hook = vision_module(model).register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        rollout = engine_for(model, processor).generate(prompts, 4, SamplingParams(max_new_tokens=6, seed=3),
                                                        prompt_inputs=inputs)
    finally:
        hook.remove()
    per_image = 16 if arch == "qwen2_vl" else 1  # Qwen2-VL's tower takes patches, CLIP whole images
    assert seen == [3 * per_image]  # one call, the chunk's three images
    assert len(rollout) == 12 and rollout.extras["decoded_rows"] > 0


def test_engine_logprobs_equal_the_teacher_forced_forward_with_images(vlm):
    """Sampled at temperature 1, the engine's log-probs equal `response_logps` on the rollout's
    `SequenceBatch` (what the policy, reference and critic forwards run: the multimodal body with
    each row's pixel inputs, image tokens never scored); with the images swapped between the
    prompts the same tokens score differently, so the forward reads them."""
    _, model, processor = vlm
    prompts, inputs = image_prompts(processor)
    sampling = SamplingParams(max_new_tokens=8, seed=11, suppress_token_ids=placeholder_token_ids(model.config))
    rollout = engine_for(model, processor).generate(prompts, 3, sampling, prompt_inputs=inputs)
    batch = SequenceBatch.from_rollout(rollout, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logps = response_logps(model, batch)[0]
    mask = batch.response_mask
    torch.testing.assert_close(logps[mask], rollout.response_logprobs[mask], atol=2e-4, rtol=1e-4)
    image_ids = set(placeholder_token_ids(model.config))
    prompt_positions = ~batch.sequence_mask & batch.attention_mask.bool()
    assert all(int(t) not in image_ids for t in batch.input_ids[batch.sequence_mask])
    assert any(int(t) in image_ids for t in batch.input_ids[prompt_positions])
    swapped = SequenceBatch(batch.input_ids, batch.attention_mask, batch.sequence_mask, batch.response_mask,
                            [rollout.prompt_inputs[(row + 3) % len(rollout)] for row in range(len(rollout))])
    if "image_grid_thw" in inputs[0]:  # same grids, so swapping whole prompts' inputs is consistent
        with torch.no_grad():
            other = response_logps(model, swapped)[0]
        assert not torch.allclose(other[mask], logps[mask], atol=1e-4)


def test_the_critic_of_a_vlm_reads_the_images(vlm):
    """`ValueModel.from_policy` on a VLM copies its multimodal body (vision tower frozen), so
    values change with the picture; the policy's own tower is untouched."""
    _, model, processor = vlm
    critic = ValueModel.from_policy(model)
    assert critic.multimodal
    assert not any(p.requires_grad for n, p in critic.backbone.named_parameters() if "vision_tower" in n or
                   (".visual." in f".{n}" and "merger" not in n))
    torch.nn.init.normal_(critic.head.weight, std=1.0)
    prompts, inputs = image_prompts(processor, shapes=("square", "triangle"), questions=QUESTIONS[:1] * 2)
    assert prompts[0] == prompts[1]  # the same text, two pictures
    sampling = SamplingParams(max_new_tokens=4, greedy=True, suppress_token_ids=placeholder_token_ids(model.config))
    rollout = engine_for(model, processor).generate(prompts, 1, sampling, prompt_inputs=inputs)
    batch = SequenceBatch.from_rollout(rollout, processor.tokenizer.pad_token_id)
    forced = SequenceBatch(batch.input_ids[[0, 0]], batch.attention_mask[[0, 0]], batch.sequence_mask[[0, 0]],
                           batch.response_mask[[0, 0]], inputs)  # row 0's tokens under either image
    with torch.no_grad():
        values = critic.values(forced)
    assert not torch.allclose(values[0], values[1])


def test_suppressed_tokens_are_never_drawn_and_scores_stay_unfiltered():
    """`suppress_token_ids` (a VLM run's image placeholders) removes tokens from the draw, greedy
    and sampled, while the returned log-prob is the unfiltered log softmax, like top-k."""
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0], [3.0, 2.9, 0.0, 0.0]])
    full = torch.log_softmax(logits, -1)
    tokens, logps = sample_next_tokens(logits, SamplingParams(greedy=True, suppress_token_ids=(1,)), None)
    assert tokens.tolist() == [2, 0]
    torch.testing.assert_close(logps, full[[0, 1], [2, 0]])
    uniforms = torch.linspace(0, 0.999, 64, dtype=torch.float64)
    drawn, _ = sample_next_tokens(logits[[0]].expand(64, -1), SamplingParams(suppress_token_ids=(1, 2)), uniforms)
    assert set(drawn.tolist()) <= {0, 3} and set(drawn.tolist()) == {0, 3}
    unsuppressed, _ = sample_next_tokens(logits[[0]].expand(64, -1), SamplingParams(), uniforms)
    assert 1 in unsuppressed.tolist()


def test_a_group_shares_one_encoding_of_its_prompt_images(vlm):
    """In the teacher-forced forward over a rollout (3 prompts x 4 rows), the tower encodes each
    prompt's image once (`encode_images_once`), with the same log-probs as encoding every row's."""
    arch, model, processor = vlm
    prompts, inputs = image_prompts(processor)
    sampling = SamplingParams(max_new_tokens=6, seed=5, suppress_token_ids=placeholder_token_ids(model.config))
    rollout = engine_for(model, processor).generate(prompts, 4, sampling, prompt_inputs=inputs)
    batch = SequenceBatch.from_rollout(rollout, processor.tokenizer.pad_token_id)
    copied = SequenceBatch(batch.input_ids, batch.attention_mask, batch.sequence_mask, batch.response_mask,
                           [dict(one) for one in batch.prompt_inputs])  # distinct dicts: nothing shared
    seen = []
    hook = vision_module(model).register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            shared = response_logps(model, batch)[0]
            per_row = response_logps(model, copied)[0]
    finally:
        hook.remove()
    per_image = 16 if arch == "qwen2_vl" else 1
    assert seen == [3 * per_image, 12 * per_image]
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)
