"""What the CLI's `sample`, `upscale` and `edit` commands run: a cascade or one stage, from the registry or disk.

Sources are a registry URI ("models:/<name>@champion", "models:/<name>-base/3") or local checkpoint directories.
Every function is deterministic for a seed and takes a `progress(stage_name, step, total)` callback.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch

from imagen_core.cascade import Cascade
from imagen_core.diffusion.samplers import SamplerConfig, SamplerKind
from imagen_core.inpaint import InpaintConfig, inpaint
from imagen_core.stage import DiffusionStage
from imagen_core.text_encoder import TextEncoder, build_text_encoder
from pipelines.registry.images import read_image, write_png
from pipelines.registry.loading import LoadedCascade, load_cascade, load_stages
from pipelines.registry.safety import SafetyChecker

Progress = Callable[[str, int, int], None]
WeightsDtype = Literal["fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Source = str | os.PathLike | Sequence[str | os.PathLike]


@dataclasses.dataclass(kw_only=True, frozen=True)
class SampleConfig:
    """How to sample; None fields fall back to what the registered cascade or each stage's config says."""

    sampler: SamplerKind | None = None
    """"ancestral", "ddim" or "dpmpp_2m"."""
    steps: int | None = None
    """Model calls per stage."""
    guidance: float | None = None
    """Classifier-free guidance scale for every stage (1.0 = none)."""
    seed: int = 0
    """Seed of all noise: the same seed and settings give the same images."""
    aug_level: float | None = None
    """Noise-conditioning augmentation level of the super-resolution stages' input."""
    device: str = "cpu"
    """Torch device."""
    dtype: WeightsDtype = "fp32"
    """The stages' weights: "bf16" (or "fp16") halves memory and runs the U-Nets' matmuls in 16 bits on GPU; the
    samplers' state, guidance and thresholding stay fp32, and the images come back fp32. On CPU bf16 works but is
    rarely faster."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.sampler is not None and self.sampler not in get_args(SamplerKind):
            raise ValueError(f"sampler must be one of {get_args(SamplerKind)}, got {self.sampler!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.aug_level is not None and not 0.0 <= self.aug_level <= 1.0:
            raise ValueError(f"aug_level must be in [0, 1], got {self.aug_level}")

    def with_defaults(self, defaults: dict[str, Any]) -> "SampleConfig":
        """Fill the unset fields from a registered cascade's stored defaults."""
        fields = ("sampler", "steps", "guidance")
        unset = {f: defaults[f] for f in fields if getattr(self, f) is None and f in defaults}
        return dataclasses.replace(self, **unset)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def sampler_config(self, stage: DiffusionStage) -> SamplerConfig:
        """The sampler for one stage: this config's choices over the stage's own defaults."""
        base = stage.config.sampler
        kind = self.sampler or base.kind
        return SamplerConfig(kind=kind, steps=self.steps or base.steps, eta=base.eta if kind == "ddim" else 0.0)


@dataclasses.dataclass
class SampleOutput:
    """One generated image, or why it was withheld."""

    prompt: str
    image: torch.Tensor | None
    """(3, H, W) in [-1, 1]; None when the safety check withheld it."""
    path: pathlib.Path | None = None
    """Where it was written, if it was."""
    withheld: str | None = None
    """Why the image was withheld (the safety check's concept and score)."""


def _stage_progress(progress: Progress | None, name: str) -> Callable[[int, int], None] | None:
    return (lambda step, total: progress(name, step, total)) if progress else None


def generate(
    cascade: Cascade, prompts: Sequence[str], config: SampleConfig, progress: Progress | None = None
) -> torch.Tensor:
    """The cascade's final images (B, 3, H, W) in [-1, 1] for the prompts (Cascade.sample, one seeded generator)."""
    stages = cascade.stages
    override = config.sampler is not None or config.steps is not None
    return cascade.sample(
        list(prompts),
        guidance_scales=[config.guidance] * len(stages) if config.guidance is not None else None,
        # One sampler for every stage when the user picks one; else each stage keeps its own.
        sampler=config.sampler_config(stages[0]) if override else None,
        aug_level=config.aug_level,
        seed=config.seed,
        progress=progress,
    )[-1]


def _write(outputs: list[SampleOutput], out_dir: str | os.PathLike | None, stem: str) -> list[SampleOutput]:
    if out_dir is None:
        return outputs
    for i, output in enumerate(outputs):
        if output.image is not None:
            output.path = write_png(output.image, pathlib.Path(out_dir) / f"{stem}_{i:03d}.png")
    return outputs


def _screen(prompts: Sequence[str], images: torch.Tensor, safety: SafetyChecker | None) -> list[SampleOutput]:
    """Withhold what the safety check flags, saying which concept and how strongly."""
    flags = safety.check(images) if safety is not None else [None] * len(prompts)
    return [
        SampleOutput(prompt=p, image=None if flag else img, withheld=flag.reason() if flag else None)
        for p, img, flag in zip(prompts, images, flags)
    ]


def sample_images(
    source: Source | LoadedCascade,
    prompts: Sequence[str],
    config: SampleConfig = SampleConfig(),
    *,
    out_dir: str | os.PathLike | None = None,
    safety: SafetyChecker | None = None,
    progress: Progress | None = None,
) -> list[SampleOutput]:
    """Sample the prompts through a cascade (registry URI, checkpoint directories, or an already loaded one);
    write PNGs `sample_<i>.png` to `out_dir` when given. Flagged images are withheld, with the reason.
    An already loaded cascade is cast to `config.dtype` in place."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if isinstance(source, LoadedCascade):
        loaded = source
        for stage in loaded.cascade.stages:
            stage.to(config.torch_dtype)
    else:
        loaded = load_cascade(source, device=config.device, dtype=config.torch_dtype)
    config = config.with_defaults(loaded.defaults)
    images = generate(loaded.cascade, prompts, config, progress)
    return _write(_screen(prompts, images, safety), out_dir, "sample")


def _single_stage(source: Source, config: SampleConfig, want_sr: bool) -> DiffusionStage:
    """The base (want_sr False) or the first super-resolution stage of a source, in `config.dtype` (a given
    stage is cast in place)."""
    if isinstance(source, DiffusionStage):
        stages = [source.to(config.torch_dtype)]
    else:
        stages = load_stages(source, device=config.device, dtype=config.torch_dtype)[0]
    for stage in stages:
        if stage.config.is_super_resolution == want_sr:
            return stage
    kind = "super-resolution" if want_sr else "base"
    raise ValueError(f"{source!r} has no {kind} stage (it has {[s.config.name for s in stages]})")


@torch.no_grad()
def upscale_tensor(
    stage: DiffusionStage,
    encoder: TextEncoder,
    lowres: torch.Tensor,
    prompt: str,
    config: SampleConfig,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Upsample (1, 3, h, w) in [-1, 1] with a super-resolution stage (its input resized to lowres_size first)."""
    if not stage.config.is_super_resolution:
        raise ValueError(f"stage {stage.config.name!r} is a base stage; upscaling needs a super-resolution stage")
    embeds, mask = encoder.encode([prompt])
    generator = torch.Generator(device=lowres.device).manual_seed(config.seed)
    return stage.sample(
        embeds.to(lowres.device), mask.to(lowres.device), lowres=lowres, guidance_scale=config.guidance,
        sampler=config.sampler_config(stage), aug_level=config.aug_level, generator=generator,
        progress=_stage_progress(progress, stage.config.name),
    )


def upscale(
    source: Source | DiffusionStage,
    image_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    prompt: str = "",
    config: SampleConfig = SampleConfig(),
    safety: SafetyChecker | None = None,
    progress: Progress | None = None,
) -> SampleOutput:
    """Upsample one image file with a super-resolution stage alone (the first SR stage of the source)."""
    stage = _single_stage(source, config, want_sr=True)
    lowres = read_image(image_path, size=stage.config.lowres_size).to(config.device)
    encoder = build_text_encoder(stage.config.text_encoder, config.device)
    image = upscale_tensor(stage, encoder, lowres, prompt, config, progress)
    output = _screen([prompt], image, safety)[0]
    if out_path is not None and output.image is not None:
        output.path = write_png(output.image, out_path)
    return output


@dataclasses.dataclass(kw_only=True, frozen=True)
class EditConfig:
    """Inpainting options on top of the sampling ones."""

    sample: SampleConfig = SampleConfig()
    """Seed, guidance and device (sampler and steps do not apply: RePaint uses its own schedule)."""
    inpaint: InpaintConfig = InpaintConfig()
    """RePaint's steps, jump length and resampling count."""
    mask_threshold: float = 0.5
    """Mask pixels brighter than this (in [0, 1]) are regenerated; the rest is kept."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {self.mask_threshold}")


@torch.no_grad()
def edit(
    source: Source | DiffusionStage,
    image_path: str | os.PathLike,
    mask_path: str | os.PathLike,
    prompt: str,
    out_path: str | os.PathLike | None = None,
    *,
    config: EditConfig = EditConfig(),
    safety: SafetyChecker | None = None,
    progress: Progress | None = None,
) -> SampleOutput:
    """Regenerate the white part of `mask_path` in `image_path` to match `prompt` (RePaint with the base stage).

    Both are resized to the base stage's resolution; the black part of the mask comes back as the input
    image (exactly, up to that resize). The output is at the base resolution: chain `upscale` for more.
    """
    stage = _single_stage(source, config.sample, want_sr=False)
    size, device = stage.config.image_size, config.sample.device
    image = read_image(image_path, size=size).to(device)
    regenerate = (read_image(mask_path, size=size, mode="L").to(device) + 1.0) / 2.0 > config.mask_threshold
    if not regenerate.any():
        raise ValueError(f"mask {mask_path} has no white pixels: nothing to edit (white = regenerate, black = keep)")
    encoder = build_text_encoder(stage.config.text_encoder, device)
    embeds, mask = encoder.encode([prompt])
    generator = torch.Generator(device=device).manual_seed(config.sample.seed)
    result = inpaint(
        stage, embeds, mask, image, (~regenerate).float(), config=config.inpaint, guidance_scale=config.sample.guidance,
        generator=generator, progress=_stage_progress(progress, stage.config.name),
    )
    output = _screen([prompt], result, safety)[0]
    if out_path is not None and output.image is not None:
        output.path = write_png(output.image, out_path)
    return output
