"""Named recipes: plain functions returning configs, from a CPU test net up to the paper's sizes.

The tests, the CPU demo and a cluster run share the same machinery with different sizes
(torchtitan's config registry). Paper sizes (Saharia et al. 2022, Table/App. B, F): base 2B, SR 64->256 600M,
SR 256->1024 400M; `tests/test_unet.py` builds them on the meta device and checks each within 10%.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from imagen_core.diffusion.schedule import ScheduleConfig
from imagen_core.stage import StageConfig
from imagen_core.text_encoder import ASSET_PREFIX, ASSETS_DIR, TextEncoderConfig
from imagen_core.unet import UNetConfig

T5_XXL_DIM = 4096
"""Width of T5-XXL's per-token embeddings, the paper's text encoder."""


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())


def unet_tiny() -> UNetConfig:
    """16x16 base net for unit tests: a fraction of a second per forward/backward on one CPU thread."""
    return UNetConfig(
        image_size=16,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=(1, 1),
        self_attention=(False, True),
        cross_attention=(False, True),
        attention_head_dim=16,
        text_embed_dim=32,
        cond_dim=64,
        norm_groups=8,
    )


def unet_tiny_sr() -> UNetConfig:
    """The tiny net as a super-resolution Efficient U-Net (8 -> 16 in the tests): every Efficient U-Net path runs."""
    return dataclasses.replace(
        unet_tiny(),
        lowres_cond=True,
        memory_efficient=True,
        scale_skip=True,
        attention_every_block=False,
        self_attention=(False, False),
        cross_attention=(False, True),
    )


def unet_demo_base() -> UNetConfig:
    """32x32 base net for the CPU demo (trains in minutes); text from a tiny T5 with d_model 64."""
    return UNetConfig(
        image_size=32,
        base_channels=32,
        channel_mults=(1, 2, 2),
        num_res_blocks=(1, 2, 2),
        self_attention=(False, True, True),  # attention at 16 and 8, as the paper's base at 32, 16, 8
        cross_attention=(False, True, True),
        attention_head_dim=32,
        text_embed_dim=64,
        cond_dim=128,
        norm_groups=8,  # 4 channels per group: with 32 groups of 1 the net could not carry flat colours
    )


def unet_demo_sr() -> UNetConfig:
    """32 -> 64 super-resolution Efficient U-Net for the CPU demo (layout of the paper's SR 64->256, shrunk)."""
    return UNetConfig(
        image_size=64,
        base_channels=32,
        channel_mults=(1, 2, 4),
        num_res_blocks=(1, 2, 2),
        self_attention=(False, False, True),
        cross_attention=(False, False, True),
        attention_every_block=False,
        attention_head_dim=32,
        text_embed_dim=64,
        cond_dim=128,
        norm_groups=8,
        lowres_cond=True,
        memory_efficient=True,
        scale_skip=True,
    )


def unet_paper_base_2b() -> UNetConfig:
    """Imagen base 64x64, 2B parameters (App. B: embed dim 512, mults [1,2,3,4], 3 res blocks, 64-ch heads,
    attention at 32, 16, 8). Free choices, all Dhariwal & Nichol's: cond_dim = 4 x 512; attention (self + text
    keys/values) after every residual block of levels 1-3 and in the middle block; no feed-forward in attention.
    This lands at 1.98B."""
    return UNetConfig(
        image_size=64,
        base_channels=512,
        channel_mults=(1, 2, 3, 4),
        num_res_blocks=(3, 3, 3, 3),
        self_attention=(False, True, True, True),
        cross_attention=(False, True, True, True),
        attention_head_dim=64,
        text_embed_dim=T5_XXL_DIM,
        cond_dim=2048,
    )


def unet_paper_sr256_600m() -> UNetConfig:
    """Imagen 64 -> 256, 600M parameters: Efficient U-Net (App. F) with channels [128, 256, 512, 1024],
    res blocks [2, 4, 8, 8], self- and cross-attention only at the 1024-channel level. Free choices:
    one attention layer per level per path (the paper's DBlock/UBlock) plus the middle block's; cond_dim = 4 x 128.
    This lands at 633M (+5.5%)."""
    return UNetConfig(
        image_size=256,
        base_channels=128,
        channel_mults=(1, 2, 4, 8),
        num_res_blocks=(2, 4, 8, 8),
        self_attention=(False, False, False, True),
        cross_attention=(False, False, False, True),
        attention_every_block=False,
        attention_head_dim=64,
        text_embed_dim=T5_XXL_DIM,
        cond_dim=512,
        lowres_cond=True,
        memory_efficient=True,
        scale_skip=True,
    )


def unet_paper_sr1024_400m() -> UNetConfig:
    """Imagen 256 -> 1024, 400M parameters: Efficient U-Net, no self-attention (it is trained on 256 crops and
    run on 1024 images), text cross-attention kept at the lowest level. The paper does not give the layout that
    makes 400M: the 600M layout minus self-attention is 627M here, so the 1024-channel level keeps 4 residual
    blocks instead of 8 (parameters stay concentrated at low resolution). This lands at 421M (+5.4%)."""
    return dataclasses.replace(
        unet_paper_sr256_600m(),
        image_size=1024,
        num_res_blocks=(2, 4, 8, 4),
        self_attention=(False, False, False, False),
        cross_attention=(False, False, False, True),
    )


# --- stage and cascade recipes -----------------------------------------------------------------------------
# A stage recipe is a U-Net recipe plus its diffusion settings and text encoder; a cascade recipe lists stages.
# The small recipes use v-prediction (Salimans & Ho 2022, as Imagen Video does): with eps-prediction the
# x0 estimate at high noise is eps's error divided by alpha ~ 0.01, so a net trained for only a few hundred
# steps never learns the layout-deciding high-noise end (measured: x0 error 0.82 at t=0.99 after 1,500 steps
# with eps, 0.25 after 400 with v). The paper recipes keep the paper's eps-prediction.

TINY_T5 = ASSET_PREFIX + "tiny-t5"
"""The random-init T5 (d_model 64) shipped as package data (imagen_core/assets/tiny-t5, made by
imagen_core/assets/make_tiny_t5.py), so tests and the small recipes need no model hub. Named, not by path: a
stage config (and an export) naming it loads wherever the package is installed. A real run names a hub model."""
TINY_T5_DIR = ASSETS_DIR / "tiny-t5"
"""Where the installed package holds it."""


def tiny_text_encoder() -> TextEncoderConfig:
    return TextEncoderConfig(kind="t5", name=TINY_T5, max_length=64)


def paper_text_encoder() -> TextEncoderConfig:
    """Frozen T5-XXL (4.6B, 4096-dim), the paper's encoder; give a local directory as `name` offline."""
    return TextEncoderConfig(kind="t5", name="google/t5-v1_1-xxl", max_length=128)


def stage_tiny_base() -> StageConfig:
    """16x16 base stage for unit tests (text width 64 matches the tiny T5)."""
    unet = dataclasses.replace(unet_tiny(), text_embed_dim=64)
    return StageConfig(name="base", unet=unet, text_encoder=tiny_text_encoder(), prediction="v")


def stage_tiny_sr() -> StageConfig:
    """16 -> 32 super-resolution stage for unit tests."""
    unet = dataclasses.replace(unet_tiny_sr(), image_size=32, text_embed_dim=64)
    return StageConfig(name="sr1", unet=unet, text_encoder=tiny_text_encoder(), lowres_size=16, prediction="v")


def stage_demo_base() -> StageConfig:
    """32x32 base stage of the CPU demo."""
    return StageConfig(
        name="base", unet=unet_demo_base(), text_encoder=tiny_text_encoder(), prediction="v", guidance_scale=3.0
    )


def stage_demo_sr() -> StageConfig:
    """32 -> 64 super-resolution stage of the CPU demo.

    Three deviations from the paper's SR stages, each measured over 400 steps on the demo corpus (one process,
    12 held-out images, PSNR against the ground truth; bicubic: 36.9 dB):
    - it diffuses the residual from bicubic, x10 (std 0.04 -> 0.4; diffusion/residual.py): flat shapes make
      bicubic nearly exact, and the image-space net was at 24.3 dB;
    - it clips instead of thresholding dynamically: dynamic thresholding rescales a whole saturated image when
      sampling noise pushes 0.5% of its pixels past 1 (flat regions 40.4 dB dynamic, 44.7 static);
    - noise-conditioning augmentation up to level 0.1 (paper: up to 1) and level 0 at sampling (the paper's best
      FID): a few hundred steps on inputs noised at up to 0.5 never learned to sharpen edges (edge pixels 24.5 dB,
      bicubic 24.9); up to 0.1 they reach 27.8 and the whole image 37.8 dB.
    """
    return StageConfig(
        name="sr1",
        unet=unet_demo_sr(),
        text_encoder=tiny_text_encoder(),
        lowres_size=32,
        prediction="v",
        guidance_scale=3.0,
        train_max_aug_level=0.1,
        sample_aug_level=0.0,
        residual_scale=10.0,
        threshold_percentile=None,
    )


def stage_paper_base_2b() -> StageConfig:
    """Imagen base: 64x64, cosine schedule, eps-prediction, 10% condition dropping."""
    return StageConfig(name="base", unet=unet_paper_base_2b(), text_encoder=paper_text_encoder())


def stage_paper_sr256_600m() -> StageConfig:
    """Imagen 64 -> 256 Efficient U-Net, cosine schedule, noise-conditioning augmentation."""
    return StageConfig(name="sr1", unet=unet_paper_sr256_600m(), text_encoder=paper_text_encoder(), lowres_size=64)


def stage_paper_sr1024_400m() -> StageConfig:
    """Imagen 256 -> 1024 Efficient U-Net, linear schedule (App. F), trained on 64 -> 256 crops."""
    return StageConfig(
        name="sr2",
        unet=unet_paper_sr1024_400m(),
        text_encoder=paper_text_encoder(),
        lowres_size=256,
        schedule=ScheduleConfig(kind="linear"),
    )


STAGE_RECIPES: dict[str, Callable[[], StageConfig]] = {
    "tiny_base": stage_tiny_base,
    "tiny_sr": stage_tiny_sr,
    "demo_base": stage_demo_base,
    "demo_sr": stage_demo_sr,
    "paper_base_2b": stage_paper_base_2b,
    "paper_sr256_600m": stage_paper_sr256_600m,
    "paper_sr1024_400m": stage_paper_sr1024_400m,
}

CASCADE_RECIPES: dict[str, tuple[str, ...]] = {
    "tiny": ("tiny_base", "tiny_sr"),
    "demo": ("demo_base", "demo_sr"),
    "paper": ("paper_base_2b", "paper_sr256_600m", "paper_sr1024_400m"),
}


def stage_recipe(name: str) -> StageConfig:
    if name not in STAGE_RECIPES:
        raise KeyError(f"unknown stage recipe {name!r}; choose one of {sorted(STAGE_RECIPES)}")
    return STAGE_RECIPES[name]()


def stage_table(value: str | dict[str, Any]) -> dict[str, Any]:
    """A config file's `stage`: a recipe name (`stage = "paper_base_2b"`), a table naming a recipe and overriding
    some of its fields (`[stage] recipe = "paper_sr256_600m"` with `[stage.unet] dropout = 0.1`), or a whole
    StageConfig table. Returns the whole table; nested tables of overrides merge into the recipe's."""
    from imagen_core.config_io import ConfigError

    if isinstance(value, str):
        value = {"recipe": value}
    if not isinstance(value, dict) or "recipe" not in value:
        return value
    name = value["recipe"]
    if name not in STAGE_RECIPES:
        raise ConfigError(f"stage.recipe: unknown recipe {name!r}; choose one of {sorted(STAGE_RECIPES)}")
    return _merged(stage_recipe(name).to_dict(), {k: v for k, v in value.items() if k != "recipe"}, "stage")


def _merged(base: dict[str, Any], overrides: dict[str, Any], where: str) -> dict[str, Any]:
    from imagen_core.config_io import ConfigError

    merged = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown key {key!r}; it takes {sorted(base)}")
        if isinstance(value, dict) and isinstance(base[key], dict):
            merged[key] = _merged(base[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def cascade_recipe(name: str) -> list[StageConfig]:
    if name not in CASCADE_RECIPES:
        raise KeyError(f"unknown cascade recipe {name!r}; choose one of {sorted(CASCADE_RECIPES)}")
    return [stage_recipe(stage) for stage in CASCADE_RECIPES[name]]
