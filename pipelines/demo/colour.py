"""The demo corpus's task metrics: do samples show the colours their prompts name, where they name them?

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
from pipelines.demo.corpus import POSITIONS, SHAPES, position_phrase

SYNONYMS = {"grey": "gray", "violet": "purple"}
"""Prompt words mapped to palette names."""
_BACKGROUND = re.compile(r"\b(\w+) background\b")
_WORD = re.compile(r"[a-z]+")
_PLACES = {position_phrase(p): p for p in POSITIONS}
_PLACED_SHAPE = re.compile(
    rf"\b(\w+) ({'|'.join(SHAPES)}) ({'|'.join(sorted(map(re.escape, _PLACES), key=len, reverse=True))})\b"
)


@dataclasses.dataclass(frozen=True)
class PromptColours:
    background: str | None
    """Colour of "on a <colour> background", if the prompt has one."""
    others: tuple[str, ...]
    """Other palette colours it names, in order of mention."""


@dataclasses.dataclass(frozen=True)
class PlacedShape:
    colour: str
    """Palette name of the shape's colour."""
    position: str
    """Its cell of the 3x3 grid, a key of pipelines.demo.corpus.POSITIONS ("top left", "center", ...)."""


def prompt_shapes(prompt: str, palette: Mapping[str, object] = DEMO_PALETTE) -> tuple[PlacedShape, ...]:
    """Each shape a prompt places in a named cell with a palette colour, in order of mention."""
    found = []
    for colour, _, place in _PLACED_SHAPE.findall(prompt.lower()):
        colour = SYNONYMS.get(colour, colour)
        if colour in palette:
            found.append(PlacedShape(colour, _PLACES[place]))
    return tuple(found)


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


def shapes_in_cells(
    image: torch.Tensor,
    prompt: str,
    min_fraction: float = 0.01,
    palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE,
) -> list[bool]:
    """For each shape the prompt places, whether one image (3, H, W) shows it in its cell (module docstring)."""
    shapes = prompt_shapes(prompt, palette)
    if not shapes:
        return []
    labels = classify_pixels(image[None], palette)[0]  # (H, W)
    height, width = labels.shape
    names = list(palette)
    verdicts = []
    for shape in shapes:
        of_colour = labels == names.index(shape.colour)
        total = int(of_colour.sum())
        fx, fy = POSITIONS[shape.position]
        row, col = min(int(fy * 3), 2), min(int(fx * 3), 2)
        cell = of_colour[row * height // 3:(row + 1) * height // 3, col * width // 3:(col + 1) * width // 3]
        same_colour = sum(s.colour == shape.colour for s in shapes)
        verdicts.append(total >= min_fraction * height * width and int(cell.sum()) >= 0.5 * total / same_colour)
    return verdicts


def position_accuracy(
    images: torch.Tensor,
    prompts: Sequence[str],
    min_fraction: float = 0.01,
    palette: Mapping[str, tuple[int, int, int]] = DEMO_PALETTE,
) -> tuple[float, int]:
    """(share of placed shapes shown in their named cell, number of shapes scored). Raises if none is placed."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"position_accuracy got {images.shape[0]} images but {len(prompts)} prompts")
    verdicts = [v for img, p in zip(images, prompts) for v in shapes_in_cells(img, p, min_fraction, palette)]
    if not verdicts:
        raise ValueError("no prompt places a shape of a palette colour in a named cell: position accuracy is undefined")
    return sum(verdicts) / len(verdicts), len(verdicts)
