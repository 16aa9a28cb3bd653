"""The demo corpus's task metric: do samples show the colours their prompts name?

Demo captions read "a red circle at the top left and a blue star on the right on a green background"
(pipelines/demo/corpus.py). Each pixel is classified as the nearest colour of the corpus palette (RGB distance;
the palette's colours are far apart, so a sample that drifts a little still lands on the right name). A sample
passes when
- the background colour the prompt names is its dominant (most frequent) pixel colour, and
- every other colour it names covers at least `min_fraction` of its pixels (shapes are small: about 3-8% each).
A prompt without a background phrase needs each named colour to cover `min_fraction`; prompts naming no palette
colour are not scored.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch

from pipelines.demo.corpus import COLOURS as DEMO_PALETTE

SYNONYMS = {"grey": "gray", "violet": "purple"}
"""Prompt words mapped to palette names."""
_BACKGROUND = re.compile(r"\b(\w+) background\b")
_WORD = re.compile(r"[a-z]+")


@dataclasses.dataclass(frozen=True)
class PromptColours:
    background: str | None
    """Colour of "on a <colour> background", if the prompt has one."""
    others: tuple[str, ...]
    """Other palette colours it names, in order of mention."""


def prompt_colours(prompt: str, palette: Mapping[str, object] = DEMO_PALETTE) -> PromptColours:
    """The palette colours a prompt names, split into the background's and the rest."""
    text = prompt.lower()
    match = _BACKGROUND.search(text)
    background = SYNONYMS.get(match[1], match[1]) if match else None
    background = background if background in palette else None
    others: list[str] = []
    for word in _WORD.findall(text[: match.start()] if match and background else text):
        name = SYNONYMS.get(word, word)
        if name in palette and name not in others:
            others.append(name)
    return PromptColours(background, tuple(others))


def classify_pixels(images: torch.Tensor, palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE) -> torch.Tensor:
    """Index into the palette's names for every pixel: (B, 3, H, W) in [-1, 1] -> (B, H, W) long (nearest in RGB)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"classify_pixels takes RGB images (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    rgb = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).permute(0, 2, 3, 1)  # (B, H, W, 3) in [0, 255]
    centres = torch.tensor(list(palette.values()), dtype=torch.float32)  # (K, 3)
    distances = (rgb[..., None, :] - centres).square().sum(-1)  # (B, H, W, K)
    return distances.argmin(-1)


def colour_fractions(images: torch.Tensor, palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE) -> torch.Tensor:
    """(B, K) share of each image's pixels nearest to each palette colour."""
    labels = classify_pixels(images, palette).flatten(1)
    counts = torch.stack([torch.bincount(row, minlength=len(palette)) for row in labels])
    return counts.float() / labels.shape[1]


def dominant_colour(image: torch.Tensor, palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE) -> str:
    """The most frequent palette colour of one image (3, H, W) in [-1, 1]."""
    return list(palette)[int(colour_fractions(image[None], palette)[0].argmax())]


def background_accuracy(
    images: torch.Tensor, prompts: Sequence[str], palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE
) -> tuple[float, int]:
    """(share of samples whose dominant colour is the background their prompt names, number scored)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"background_accuracy got {images.shape[0]} images but {len(prompts)} prompts")
    pairs = [(img, prompt_colours(p, palette).background) for img, p in zip(images, prompts)]
    scored = [dominant_colour(img, palette) == background for img, background in pairs if background is not None]
    if not scored:
        raise ValueError("no prompt names a background colour of the palette: background accuracy is undefined")
    return sum(scored) / len(scored), len(scored)


def shows_prompted_colours(
    image: torch.Tensor,
    prompt: str,
    min_fraction: float = 0.01,
    palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE,
) -> bool | None:
    """Whether one image shows the colours its prompt names (rules in the module docstring); None if it names none."""
    wanted = prompt_colours(prompt, palette)
    if wanted.background is None and not wanted.others:
        return None
    fractions = dict(zip(palette, colour_fractions(image[None], palette)[0].tolist()))
    if wanted.background is not None and max(fractions, key=fractions.get) != wanted.background:
        return False
    return all(fractions[name] >= min_fraction for name in wanted.others)


def colour_accuracy(
    images: torch.Tensor,
    prompts: Sequence[str],
    min_fraction: float = 0.01,
    palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE,
) -> tuple[float, int]:
    """(share of scored samples that show their prompted colours, number scored). Raises if none can be scored."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"colour_accuracy got {images.shape[0]} images but {len(prompts)} prompts")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    verdicts = [shows_prompted_colours(img, p, min_fraction, palette) for img, p in zip(images, prompts)]
    scored = [v for v in verdicts if v is not None]
    if not scored:
        raise ValueError(f"no prompt names a colour of the palette {sorted(palette)}: colour accuracy is undefined")
    return sum(scored) / len(scored), len(scored)
