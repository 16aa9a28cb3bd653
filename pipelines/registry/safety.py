"""Output safety check: CLIP zero-shot against the unsafe concept list curation filters training data with.

Same rule as curation's unsafe filter (pipelines/curate.py): an image's margin is its best cosine similarity to
an unsafe concept minus its best similarity to a safe one; it is flagged when the margin exceeds `margin`. So
generation withholds what curation would have kept out of the training data. Concepts and margin default to
curation's (`ScoreConfig`, `UnsafeFilter`); `SafetyConfig.from_curation` copies a curation run's settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from pipelines.clip_model import Clip, ClipConfig
from pipelines.curate import DEFAULT_SAFE, DEFAULT_UNSAFE, ScoreConfig, UnsafeFilter
from pipelines.registry.images import to_pil


@dataclasses.dataclass(kw_only=True, frozen=True)
class SafetyConfig:
    """Which CLIP, concepts and margin the output check uses."""

    clip: ClipConfig
    """The open_clip model (the one curation scored with)."""
    unsafe_concepts: tuple[str, ...] = DEFAULT_UNSAFE
    """Concepts to withhold (curation's list)."""
    safe_concepts: tuple[str, ...] = DEFAULT_SAFE
    """Concepts an acceptable image matches at least as well as any unsafe one (curation's list)."""
    margin: float = UnsafeFilter().margin
    """Flag when best unsafe cosine - best safe cosine > margin (curation's UnsafeFilter.margin)."""

    def __post_init__(self) -> None:
        for label, concepts in (("unsafe_concepts", self.unsafe_concepts), ("safe_concepts", self.safe_concepts)):
            if not concepts or any(not c.strip() for c in concepts):
                raise ValueError(f"SafetyConfig.{label} must be a non-empty tuple of non-empty texts")

    @classmethod
    def from_curation(cls, score: ScoreConfig, unsafe: UnsafeFilter = UnsafeFilter()) -> "SafetyConfig":
        """The settings a curation run used, so outputs meet the bar the training data met."""
        return cls(clip=score.clip, unsafe_concepts=score.unsafe_concepts, safe_concepts=score.safe_concepts,
                   margin=unsafe.margin)


@dataclasses.dataclass(frozen=True)
class SafetyFlag:
    """Why an image was flagged."""

    concept: str
    """The unsafe concept it is closest to."""
    margin: float
    """Best unsafe cosine minus best safe cosine."""
    threshold: float

    def reason(self) -> str:
        return (f"withheld by the safety check: closest to unsafe concept {self.concept!r} "
                f"(CLIP margin {self.margin:.3f} > {self.threshold:.3f})")


def safety_check(
    images: torch.Tensor,
    clip: Clip,
    unsafe_concepts: Sequence[str],
    safe_concepts: Sequence[str],
    margin: float = 0.0,
) -> list[SafetyFlag | None]:
    """Per image (B, 3, H, W) in [-1, 1]: a SafetyFlag when its unsafe margin exceeds `margin`, else None."""
    if not unsafe_concepts or not safe_concepts:
        raise ValueError("safety_check needs at least one unsafe and one safe concept")
    image_embeds = clip.encode_images(to_pil(images))
    concepts = clip.encode_texts(list(unsafe_concepts) + list(safe_concepts))
    sims = image_embeds @ concepts.T  # unit vectors: cosine similarities (B, U + S)
    unsafe, safe = sims[:, : len(unsafe_concepts)], sims[:, len(unsafe_concepts):]
    best_unsafe, index = unsafe.max(dim=1)
    margins = best_unsafe - safe.max(dim=1).values
    return [
        SafetyFlag(concept=unsafe_concepts[int(i)], margin=float(m), threshold=margin) if float(m) > margin else None
        for m, i in zip(margins, index)
    ]


class SafetyChecker:
    """A loaded CLIP and concept lists, to check many batches."""

    def __init__(self, config: SafetyConfig) -> None:
        self.config = config
        self.clip = Clip(config.clip)

    def check(self, images: torch.Tensor) -> list[SafetyFlag | None]:
        cfg = self.config
        return safety_check(images, self.clip, cfg.unsafe_concepts, cfg.safe_concepts, cfg.margin)
