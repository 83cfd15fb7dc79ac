"""Rewards of generated images: `(prompts, images, **columns) -> list[float]`, images as PIL.

Built-ins (names for --reward):

- `redness`     mean over pixels of R - (G + B) / 2, in [-1, 1] (a planted colour rule);
- `brightness`  mean luminance 0.299 R + 0.587 G + 0.114 B, in [0, 1];
- `aesthetic`   a STAND-IN aesthetic-style score: a hand-set linear probe (weights shipped in
                alignkit/assets/diffusion_aesthetic_probe.json) over six colour statistics
                (`colour_features`). It was not fitted to human ratings; it exists so demos
                and tests have a smooth, deterministic "aesthetic" score with no download. A
                real aesthetic predictor (LAION's MLP on CLIP ViT-L/14) is a Python reward away.

Any other spec is `file.py:function` or `package.module:function`, called as
`fn(prompts, images, **columns)` (columns: the data row's other columns, one list each) and
returning one finite number per image.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import numpy as np

ImageReward = Callable[..., list[float]]


def pixels(image: Any) -> np.ndarray:
    """An RGB PIL image as floats in [0, 1], (H, W, 3)."""
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def redness(prompts: Sequence[Any], images: Sequence[Any], **columns: Any) -> list[float]:
    """Mean of R - (G + B) / 2 over the pixels of each image, in [-1, 1]."""
    scores = []
    for image in images:
        rgb = pixels(image)
        scores.append(float((rgb[..., 0] - (rgb[..., 1] + rgb[..., 2]) / 2).mean()))
    return scores


def brightness(prompts: Sequence[Any], images: Sequence[Any], **columns: Any) -> list[float]:
    """Mean luminance (ITU-R 601 weights) of each image, in [0, 1]."""
    return [float((pixels(image) @ np.array([0.299, 0.587, 0.114])).mean()) for image in images]


def colour_features(image: Any, brightness_target: float = 0.5) -> list[float]:
    """Six statistics of an image, each roughly in [0, 1]: closeness of mean luminance to
    `brightness_target` (1 - 2|mean - target|), luminance std x 2 (contrast), mean HSV-style
    saturation, Hasler-Suesstrunk colourfulness / 100 (on 0..255 values), and the fractions of
    near-black (< 0.05) and near-white (> 0.95) pixels."""
    rgb = pixels(image)
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-8), 0.0)
    red_green = 255 * (rgb[..., 0] - rgb[..., 1])
    yellow_blue = 255 * (0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2])
    colourfulness = math.hypot(red_green.std(), yellow_blue.std()) + 0.3 * math.hypot(
        red_green.mean(), yellow_blue.mean())
    return [
        1.0 - 2.0 * abs(float(luminance.mean()) - brightness_target),
        2.0 * float(luminance.std()),
        float(saturation.mean()),
        colourfulness / 100.0,
        float((luminance < 0.05).mean()),
        float((luminance > 0.95).mean()),
    ]


@functools.cache
def aesthetic_probe() -> dict[str, Any]:
    """The shipped stand-in probe: features, weights, bias (assets/diffusion_aesthetic_probe.json)."""
    text = resources.files("alignkit").joinpath("assets/diffusion_aesthetic_probe.json").read_text()
    return json.loads(text)


def aesthetic(prompts: Sequence[Any], images: Sequence[Any], **columns: Any) -> list[float]:
    """The stand-in aesthetic-style score: bias + weights . colour_features(image)."""
    probe = aesthetic_probe()
    weights = np.array(probe["weights"], dtype=np.float64)
    return [float(probe["bias"] + weights @ np.array(colour_features(image, probe["brightness_target"])))
            for image in images]


BUILTIN_IMAGE_REWARDS: dict[str, ImageReward] = {"redness": redness, "brightness": brightness,
                                                 "aesthetic": aesthetic}


def load_image_reward(spec: Any) -> ImageReward:
    """A reward of images from a built-in name, `file.py:function`, `module:function`, or a callable."""
    if callable(spec):
        return spec
    spec = str(spec).strip()
    if spec in BUILTIN_IMAGE_REWARDS:
        return BUILTIN_IMAGE_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"--reward {spec!r}: not a built-in image reward ({', '.join(BUILTIN_IMAGE_REWARDS)}) "
                         "and not file.py:function or module:function")
    from alignkit.rewards.loading import load_object

    fn = load_object(spec, what="--reward")
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {type(fn).__name__} is not callable")
    return fn


def score_images(reward: ImageReward, prompts: list[str], images: list, columns: dict[str, list], name: str) -> list[float]:
    """`reward(prompts, images, **columns)` checked: one finite number per image, else a one-line
    error naming the reward."""
    from alignkit.rewards.outputs import RewardOutputError, as_reward_tensor

    try:
        values = as_reward_tensor(reward(prompts, images, **columns), len(images))
    except RewardOutputError as error:
        raise ValueError(f"--reward {name}: {error}") from None
    if values.ndim != 1 or not bool(values.isfinite().all()):
        raise ValueError(f"--reward {name}: returned {values.tolist()}; it must return one finite number per image")
    return values.tolist()
