"""Tiny local vision-language models and synthetic images for tests (nothing fetched from a hub).

`build_tiny_vlm(path, arch)` builds a random Qwen2-VL or LLaVA model around the tiny BPE
tokenizer of `alignkit.testing` (grown by the architecture's image tokens) and saves model and
processor with `save_pretrained`, so `AutoModelForImageTextToText` / `AutoProcessor` (and
`alignkit.models.load_vlm`) load them back. Both see 56x56 images in 14-pixel patches:

- qwen2_vl: 4x4 patches, merged 2x2 by the projector -> 4 `<|image_pad|>` tokens per image;
- llava: a CLIP tower on a 56x56 crop -> 4x4 patches (+ CLS, dropped by the "default"
  feature strategy) -> 16 `<image>` tokens per image. (With 28-pixel patches, 4 tokens, the
  random tower's features barely differ between images and SFT does not learn to read them.)

`draw_shape_image` draws the coloured shapes tests plant their tasks in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignkit.testing import build_tiny_tokenizer

VLM_ARCHS = ("qwen2_vl", "llava")
IMAGE_SIZE = 56

# What a `{"type": "image"}` content part renders as, per architecture (the processor then
# expands the image token to one token per image patch).
_IMAGE_MARKUP = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}
_IMAGE_TOKENS = {
    "qwen2_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "llava": ["<image>"],
}


def vlm_chat_template(image_markup: str) -> str:
    """The tiny tokenizer's chat template, extended to content-part lists: a `{"type": "image"}`
    part renders as `image_markup`, a `{"type": "text", "text": ...}` part as its text. Plain
    string contents render exactly as `alignkit.testing.CHAT_TEMPLATE` renders them."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{image_markup}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def _tokenizer(arch: str) -> Any:
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(_IMAGE_TOKENS[arch], special_tokens=True)
    tokenizer.chat_template = vlm_chat_template(_IMAGE_MARKUP[arch])
    return tokenizer


def _text_config(tokenizer: Any, hidden_size: int, num_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _qwen2_vl(tokenizer: Any, hidden_size: int, num_layers: int) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from alignkit.models.vlm import image_only_processor

    head_half = hidden_size // 4 // 2  # rotary frequencies per head, split over (t, h, w)
    text = _text_config(tokenizer, hidden_size, num_layers)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [head_half - 2 * (head_half // 3), head_half // 3, head_half // 3],
    }
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={
            "depth": num_layers, "embed_dim": hidden_size, "hidden_size": hidden_size,
            "num_heads": 4, "mlp_ratio": 2, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    # Without a video processor (it needs torchvision); saved under the stock class name.
    processor = image_only_processor("qwen2_vl", image_processor, tokenizer, tokenizer.chat_template)
    return Qwen2VLForConditionalGeneration(config), processor


def _llava(tokenizer: Any, hidden_size: int, num_layers: int) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    patch_size = 14
    config = LlavaConfig(
        text_config={"model_type": "llama", **_text_config(tokenizer, hidden_size, num_layers)},
        vision_config={
            "model_type": "clip_vision_model", "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2, "num_hidden_layers": num_layers,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": patch_size,
            "projection_dim": hidden_size,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2,
        vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
        image_token="<image>", num_additional_image_tokens=1,
    )
    return LlavaForConditionalGeneration(config), processor


def build_tiny_vlm(
    path: str | Path, arch: str = "qwen2_vl", *, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> Path:
    """Save a random tiny vision-language model of `arch` ("qwen2_vl" or "llava") and its
    processor (image processor + tiny tokenizer with the image tokens and a chat template for
    `{"type": "image"}` parts) to `path` as safetensors; return the path."""
    import torch

    if arch not in VLM_ARCHS:
        raise ValueError(f"arch must be one of {VLM_ARCHS}, got {arch!r}")
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads, rotary pairs), got {hidden_size}")
    path = Path(path)
    tokenizer = _tokenizer(arch)
    torch.manual_seed(seed)
    model, processor = (_qwen2_vl if arch == "qwen2_vl" else _llava)(tokenizer, hidden_size, num_layers)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle", "triangle")


def draw_shape_image(
    shape: str = "square", colour: str = "red", box: tuple[int, int, int, int] = (14, 14, 42, 42),
    size: int = IMAGE_SIZE,
) -> Any:
    """A `size` x `size` RGB PIL image, white, with one filled `colour` `shape` inside `box`
    (x1, y1, x2, y2 in pixels)."""
    from PIL import Image, ImageDraw

    if shape not in SHAPES or colour not in COLOURS:
        raise ValueError(f"shape must be one of {SHAPES} and colour one of {sorted(COLOURS)}")
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    x1, y1, x2, y2 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill)
    return image


def write_image_rows(directory: str | Path, rows: list[dict[str, Any]], name: str) -> str:
    """`rows` (each with `images`: PIL images) as DIRECTORY/NAME.jsonl next to an `img/` folder of
    PNGs, the paths in the file relative to it (the data format users write); returns its path."""
    import json

    directory = Path(directory)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, row in enumerate(rows):
        relative = f"img/{name}-{k}.png"
        row["images"][0].save(directory / relative)
        lines.append(json.dumps({**row, "images": [relative]}))
    path = directory / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)
