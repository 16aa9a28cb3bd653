"""The cascade: text -> base stage -> super-resolution stages (Imagen Sec 2, Fig A.4)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from imagen_core.diffusion.samplers import SamplerConfig
from imagen_core.stage import DiffusionStage
from imagen_core.text_encoder import TextEncoder, TextEncoderConfig, build_text_encoder


class Cascade:
    """Chained stages sharing text encoders: each stage's text encoder is built once per distinct config."""

    def __init__(self, stages: Sequence[DiffusionStage], encoders: dict[TextEncoderConfig, TextEncoder]) -> None:
        if not stages:
            raise ValueError("a cascade needs at least a base stage")
        if stages[0].config.is_super_resolution:
            raise ValueError(f"the first stage must be a base stage, got super-resolution stage {stages[0].config.name!r}")
        for low, high in zip(stages, stages[1:]):
            if not high.config.is_super_resolution or high.config.lowres_size != low.config.image_size:
                raise ValueError(
                    f"stage {high.config.name!r} must upsample {low.config.image_size}px images from "
                    f"{low.config.name!r} (its lowres_size is {high.config.lowres_size})"
                )
        self.stages = list(stages)
        self.encoders = encoders

    @classmethod
    def from_stages(cls, stages: Sequence[DiffusionStage], device: torch.device | str = "cpu") -> "Cascade":
        encoders: dict[TextEncoderConfig, TextEncoder] = {}
        for stage in stages:
            if stage.config.text_encoder not in encoders:
                encoders[stage.config.text_encoder] = build_text_encoder(stage.config.text_encoder, device)
        return cls(stages, encoders)

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        *,
        guidance_scales: Sequence[float] | None = None,
        sampler: SamplerConfig | None = None,
        aug_level: float | None = None,
        seed: int = 0,
        until_stage: int | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> list[torch.Tensor]:
        """Images in [-1, 1] after each stage (the last is the cascade's output), deterministic per seed.

        Stages may hold bf16 (or fp16) weights: each U-Net casts its inputs to its weights' dtype, the samplers
        and the images passed between stages stay fp32.
        """
        stages = self.stages[: until_stage if until_stage is not None else len(self.stages)]
        device = next(stages[0].parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        outputs: list[torch.Tensor] = []
        for i, stage in enumerate(stages):
            embeds, mask = self.encoders[stage.config.text_encoder].encode(list(prompts))
            scale = guidance_scales[i] if guidance_scales is not None else None
            step_progress = (lambda s, n, name=stage.config.name: progress(name, s, n)) if progress else None
            images = stage.sample(
                embeds.to(device),
                mask.to(device),
                lowres=outputs[-1] if outputs else None,
                guidance_scale=scale,
                sampler=sampler,
                aug_level=aug_level,
                generator=generator,
                progress=step_progress,
            )
            outputs.append(images)
        return outputs
