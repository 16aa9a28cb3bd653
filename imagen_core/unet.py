"""The denoising network of every cascade stage: Imagen's U-Net (Saharia et al. 2022, Appendix B and F).

One class covers the base model (Appendix B: the Dhariwal & Nichol U-Net with BigGAN-style residual
blocks and scale-shift conditioning) and the Efficient U-Net of the super-resolution stages
(Appendix F: more residual blocks at low resolution, skip connections scaled by 1/sqrt(2),
downsampling before the convolutions and upsampling after them). Conditioning:

- the noise level is the log-SNR (B,), Fourier-embedded and passed through an MLP;
- the text embeddings are LayerNorm-ed; an attention pool over the tokens gives a vector added to that
  embedding (Sec 2.2, App. B); at configured levels the projected text tokens are concatenated to the keys
  and values of self-attention, or attended to by a cross-attention layer where only that is enabled;
- a super-resolution stage concatenates the upsampled low-resolution image to its input and adds the
  embedding of that image's augmentation log-SNR to the conditioning vector (Sec 2.5).

The module holds no parallelism code: data parallelism, ZeRO and compilation wrap it from outside.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGSNR_CLAMP = 30.0
"""log-SNR is clamped to +-this before embedding: +inf (no noise: t=0, augmentation level 0) is legal input,
and nothing beyond |logsnr| = 30 (sigma ~ 3e-7) is worth telling apart."""

FOURIER_PERIODS = (0.5, 500.0)
"""Shortest and longest period, in log-SNR units, of the Fourier features of the noise level: the shortest
separates levels ~0.1 apart, the longest is near-linear over the usual [-20, 20] range."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class UNetConfig:
    """Shape of one stage's U-Net. Per-level tuples run from the highest resolution to the lowest."""

    image_size: int
    """Side of the (square) images the stage samples, e.g. 64 for the base stage (the net also runs on crops)."""
    in_channels: int = 3
    """Channels of the noisy image x_t (and of the low-resolution conditioning image)."""
    out_channels: int = 3
    """Channels of the prediction (eps or v, same shape as x_t)."""
    base_channels: int
    """Width of the first level ("dim"/"embed dim" in the paper); level i has base_channels * channel_mults[i]."""
    channel_mults: tuple[int, ...]
    """Width multiplier per level; the number of levels is its length."""
    num_res_blocks: tuple[int, ...]
    """Residual blocks per level on the down path (the up path has as many); Efficient U-Net puts more at
    low resolution."""
    self_attention: tuple[bool, ...]
    """Per level: self-attention after each residual block, with the text tokens concatenated to its keys/values."""
    cross_attention: tuple[bool, ...]
    """Per level: attention to the text tokens. Where self_attention is also true the two share one layer (paper)."""
    attention_head_dim: int = 64
    """Channels per attention head (paper: 64); heads = level width // this."""
    attention_every_block: bool = True
    """Where a level attends: after every residual block (Dhariwal & Nichol, Imagen base) or, when False, once
    after the level's last residual block (the DBlock/UBlock of the Efficient U-Net, App. F)."""
    attention_ff_mult: int = 0
    """Hidden width multiplier of a feed-forward layer after each attention layer; 0 = none (Dhariwal & Nichol)."""
    text_embed_dim: int
    """Width of the text encoder's per-token embeddings (T5-XXL: 4096)."""
    cond_dim: int
    """Width of the conditioning vector (noise level + pooled text) fed to every residual block."""
    num_pooled_text_tokens: int = 1
    """Learned queries of the text attention pool; their outputs are flattened into the conditioning vector."""
    lowres_cond: bool = False
    """Super-resolution stage: the low-res image (upsampled to image_size) is concatenated to x_t and its
    augmentation log-SNR is embedded and added to the conditioning vector."""
    dropout: float = 0.0
    """Dropout inside residual blocks (paper base: 0)."""
    norm_groups: int = 32
    """GroupNorm groups; base_channels must be a multiple of it, with at least 2 channels per group."""
    activation_checkpointing: bool = False
    """Recompute each residual/attention block in the backward pass instead of storing its activations."""
    memory_efficient: bool = False
    """Efficient U-Net: every level downsamples before its blocks (down path) and upsamples after them (up path),
    so the convolutions run at half the resolution; otherwise every level but the last downsamples after them."""
    scale_skip: bool = False
    """Efficient U-Net: residual-block skip connections scaled by 1/sqrt(2), (skip(x) + h) / sqrt(2), as the
    `skip_rescale` of Song et al. 2021 that the paper cites."""
    resample: Literal["conv", "pixel_shuffle"] = "conv"
    """How levels change resolution. "conv": a stride-2 3x3 convolution down, nearest x2 then a 3x3 convolution up
    (Dhariwal & Nichol). "pixel_shuffle": space-to-depth then a 1x1 convolution down (SP-conv, Sunkara & Luo 2022),
    a 1x1 convolution to 4x the channels then depth-to-space up (Shi et al. 2016, ICNR-initialised as Aitken et
    al. 2017): the convolution runs at the lower resolution, 2.25x (down) and 9x (up) fewer multiply-adds; the
    paper leaves the choice open, imagen-pytorch defaults to it."""

    def __post_init__(self) -> None:
        levels = len(self.channel_mults)
        if levels == 0:
            raise ValueError("channel_mults is empty: give one width multiplier per U-Net level, e.g. (1, 2, 4)")
        for name in ("num_res_blocks", "self_attention", "cross_attention"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != levels:
                raise ValueError(
                    f"{name} must be a tuple with one entry per level ({levels}, like "
                    f"channel_mults={self.channel_mults}), got {value!r}"
                )
        if any(m < 1 for m in self.channel_mults) or any(n < 1 for n in self.num_res_blocks):
            raise ValueError(
                f"channel_mults {self.channel_mults} and num_res_blocks {self.num_res_blocks} must be >= 1"
            )
        for name in ("image_size", "in_channels", "out_channels", "base_channels", "text_embed_dim", "cond_dim",
                     "attention_head_dim", "num_pooled_text_tokens", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.attention_ff_mult < 0:
            raise ValueError(
                f"attention_ff_mult must be >= 0 (0 disables the feed-forward), got {self.attention_ff_mult}"
            )
        if self.base_channels % self.norm_groups:
            raise ValueError(f"base_channels {self.base_channels} must be a multiple of norm_groups {self.norm_groups}")
        if self.base_channels // self.norm_groups < 2:
            # One channel per group is instance norm: it removes every channel's spatial mean, so a flat colour
            # (a background) cannot pass through any block (measured: an SR net then ignored its low-res input).
            raise ValueError(
                f"norm_groups {self.norm_groups} leaves one channel per group at base_channels {self.base_channels}; "
                "use at most base_channels // 2 groups"
            )
        for level, mult in enumerate(self.channel_mults):
            attends = self.self_attention[level] or self.cross_attention[level]
            if attends and (self.base_channels * mult) % self.attention_head_dim:
                raise ValueError(
                    f"level {level} width {self.base_channels * mult} is not a multiple of attention_head_dim "
                    f"{self.attention_head_dim}; change the width or the head size"
                )
        if self.cond_dim % self.attention_head_dim:
            raise ValueError(
                f"cond_dim {self.cond_dim} must be a multiple of attention_head_dim {self.attention_head_dim} "
                "(the text attention pool has cond_dim // attention_head_dim heads)"
            )
        factor = 2**self.num_downsamples
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**{self.num_downsamples} = {factor} "
                f"({levels} levels, memory_efficient={self.memory_efficient})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.resample not in ("conv", "pixel_shuffle"):
            raise ValueError(f"resample must be 'conv' or 'pixel_shuffle', got {self.resample!r}")

    @property
    def num_downsamples(self) -> int:
        """Memory-efficient nets halve the resolution at every level, the others between levels."""
        return len(self.channel_mults) if self.memory_efficient else len(self.channel_mults) - 1

    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; `from_dict` restores it exactly (tuples included)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {unknown}; known fields: {sorted(names)}")
        tuple_fields = ("channel_mults", "num_res_blocks", "self_attention", "cross_attention")
        return cls(**{k: tuple(v) if k in tuple_fields else v for k, v in data.items()})


def fourier_embedding(logsnr: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) log-SNR -> (B, dim) sin/cos features at log-spaced periods (a sinusoidal timestep embedding in log-SNR)."""
    half = dim // 2
    periods = torch.logspace(
        math.log10(FOURIER_PERIODS[0]), math.log10(FOURIER_PERIODS[1]), half, device=logsnr.device, dtype=torch.float32
    )
    angles = logsnr.float().clamp(-LOGSNR_CLAMP, LOGSNR_CLAMP)[:, None] * (2 * math.pi / periods)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class NoiseLevelEmbedding(nn.Module):
    """Fourier features of the log-SNR (`fourier_embedding`, computed in fp32 by the U-Net) -> 2-layer MLP ->
    (B, cond_dim)."""

    def __init__(self, fourier_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.fourier_dim = fourier_dim
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, width // head_dim, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class TextAttentionPool(nn.Module):
    """Attention pooling of the text tokens into the conditioning vector (Imagen Sec 2.2 / App. B).

    As CLIP's attention pool, the query is the masked mean of the (LayerNorm-ed) tokens, here plus
    `num_queries` learned offsets; keys and values are the tokens, padding masked out.
    """

    def __init__(self, text_dim: int, width: int, num_queries: int, head_dim: int, out_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.norm = nn.LayerNorm(text_dim)
        self.to_q = nn.Linear(text_dim, width)
        self.to_kv = nn.Linear(text_dim, 2 * width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.out = nn.Sequential(nn.LayerNorm(num_queries * width), nn.Linear(num_queries * width, out_dim))

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(text)
        weights = mask.to(tokens.dtype)[..., None]
        mean = (tokens * weights).sum(1) / weights.sum(1)  # mask[:, 0] is always true: no division by zero
        q = self.to_q(mean)[:, None] + self.queries[None]  # (B, Q, W)
        k, v = self.to_kv(tokens).chunk(2, dim=-1)
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query sees the real tokens
        pooled = F.scaled_dot_product_attention(
            _heads(q, self.head_dim), _heads(k, self.head_dim), _heads(v, self.head_dim), attn_mask=attn_mask
        )
        return self.out(_merge_heads(pooled).flatten(1))


class ResBlock(nn.Module):
    """BigGAN-style residual block (Dhariwal & Nichol 2021, used by Imagen App. B and F):
    GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> dropout -> conv3x3, plus a 1x1 skip
    where the width changes; (scale, shift) come from the conditioning vector."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, groups: int, dropout: float, scale_skip: bool) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.skip_scale = 2**-0.5 if scale_skip else 1.0
        # Zero-init the residual branch (ADM's zero_module): every block starts as its skip path, so the input,
        # and for an SR net the low-resolution image, reaches the output from the first step.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * self.skip_scale


class AttentionBlock(nn.Module):
    """Multi-head attention over the pixels of a feature map, conditioned on text.

    self_attend=True: queries from the pixels, keys/values from the pixels and the projected text tokens
    concatenated (Imagen App. B). self_attend=False: cross-attention, keys/values from the text only.
    Padding tokens are masked out; `text_mask[:, 0]` is always true, so no query row is fully masked.
    """

    def __init__(
        self, channels: int, text_dim: int, head_dim: int, groups: int, self_attend: bool, ff_mult: int
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.self_attend = self_attend
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_kv = nn.Linear(channels, 2 * channels) if self_attend else None
        self.text_to_kv = nn.Linear(text_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)  # starts as the identity, as the residual blocks
        nn.init.zeros_(self.proj.bias)
        self.ff = None
        if ff_mult:
            self.ff = nn.Sequential(
                nn.LayerNorm(channels),
                nn.Linear(channels, ff_mult * channels),
                nn.GELU(),
                nn.Linear(ff_mult * channels, channels),
            )

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        pixels = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        k, v = self.text_to_kv(text).chunk(2, dim=-1)
        mask = text_mask
        if self.self_attend:
            k_img, v_img = self.to_kv(pixels).chunk(2, dim=-1)
            k, v = torch.cat([k_img, k], dim=1), torch.cat([v_img, v], dim=1)
            mask = torch.cat([text_mask.new_ones(batch, height * width), text_mask], dim=1)
        out = F.scaled_dot_product_attention(
            _heads(self.to_q(pixels), self.head_dim),
            _heads(k, self.head_dim),
            _heads(v, self.head_dim),
            attn_mask=mask[:, None, None, :],
        )
        h = x.flatten(2).transpose(1, 2) + self.proj(_merge_heads(out))
        if self.ff is not None:
            h = h + self.ff(h)
        return h.transpose(1, 2).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 convolution (Dhariwal & Nichol's resample_with_conv), or with
    kind="pixel_shuffle" each 2x2 patch stacked into channels, then a 1x1 convolution (SP-conv)."""

    def __init__(self, channels: int, kind: str = "conv") -> None:
        super().__init__()
        self.shuffle = kind == "pixel_shuffle"
        self.conv = nn.Conv2d(4 * channels, channels, 1) if self.shuffle else nn.Conv2d(channels, channels, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pixel_unshuffle(x, 2) if self.shuffle else x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2 then a 3x3 convolution (no transposed-conv checkerboards), or
    with kind="pixel_shuffle" a 1x1 convolution to 4x the channels, SiLU, then each pixel's channel groups spread
    over a 2x2 patch. ICNR initialisation (the four sub-pixel filters start equal) makes the latter start as a
    1x1 convolution followed by a nearest x2, also free of checkerboards."""

    def __init__(self, channels: int, kind: str = "conv") -> None:
        super().__init__()
        self.shuffle = kind == "pixel_shuffle"
        if self.shuffle:
            self.conv = nn.Conv2d(channels, 4 * channels, 1)
            with torch.no_grad():  # ICNR: output channel c*4 + k (k: sub-pixel) copies filter c
                self.conv.weight.copy_(self.conv.weight[::4].repeat_interleave(4, dim=0))
                nn.init.zeros_(self.conv.bias)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shuffle:
            return F.pixel_shuffle(F.silu(self.conv(x)), 2)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of one path: optional resample, then residual blocks, each optionally followed by attention."""

    def __init__(self, resblocks: list[ResBlock], attentions: list[AttentionBlock] | None,
                 resample_before: nn.Module | None, resample_after: nn.Module | None) -> None:
        super().__init__()
        self.resample_before = resample_before
        self.resblocks = nn.ModuleList(resblocks)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resample_after = resample_after

    def attention_after(self, block: int) -> AttentionBlock | None:
        """The attention layer following residual block `block`: its own, or the level's one after the last block."""
        if self.attentions is None:
            return None
        if len(self.attentions) == len(self.resblocks):
            return self.attentions[block]
        return self.attentions[0] if block == len(self.resblocks) - 1 else None


class EfficientUNet(nn.Module):
    """Imagen's U-Net; see the module docstring. `forward` returns a tensor shaped like `x`."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        widths = cfg.level_channels()
        self.noise_embed = NoiseLevelEmbedding(cfg.base_channels, cfg.cond_dim)
        self.lowres_noise_embed = NoiseLevelEmbedding(cfg.base_channels, cfg.cond_dim) if cfg.lowres_cond else None
        self.text_norm = nn.LayerNorm(cfg.text_embed_dim)
        self.text_pool = TextAttentionPool(
            cfg.text_embed_dim, cfg.cond_dim, cfg.num_pooled_text_tokens, cfg.attention_head_dim, cfg.cond_dim
        )
        input_channels = cfg.in_channels * (2 if cfg.lowres_cond else 1)
        self.input_conv = nn.Conv2d(input_channels, widths[0], 3, padding=1)

        self.down, skip_widths = self._build_down(widths)
        width = widths[-1]
        self.mid_block1 = self._resblock(width, width)
        self.mid_attention = self._attention(len(widths) - 1, width)
        self.mid_block2 = self._resblock(width, width)
        self.up = self._build_up(widths, skip_widths)
        width = widths[0]
        # Efficient U-Net: every level runs at half resolution or below, so nothing after the input convolution
        # sees single pixels. A last residual block at full resolution, on the up path's output concatenated with
        # the input convolution's (imagen-pytorch's init_conv_to_final_conv_residual + final_res_block), restores
        # that; without it an SR net could not denoise at low noise levels (measured: x0 worse than x_t at t=0.05).
        self.full_res_block = self._resblock(2 * width, width) if cfg.memory_efficient else None

        self.out_norm = nn.GroupNorm(cfg.norm_groups, width)
        self.out_conv = nn.Conv2d(width, cfg.out_channels, 3, padding=1)
        # Zero-init: the untrained net predicts 0, and the output scale is learned from there.
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _build_down(self, widths: tuple[int, ...]) -> tuple[nn.ModuleList, list[list[int]]]:
        """Down path, highest resolution first; also the widths of the skip features each level leaves."""
        cfg = self.config
        levels, skip_widths = nn.ModuleList(), []
        width = widths[0]
        for level, out_width in enumerate(widths):
            last = level == len(widths) - 1
            before = Downsample(width, cfg.resample) if cfg.memory_efficient else None
            blocks = [self._resblock(width, out_width)]
            blocks += [self._resblock(out_width, out_width) for _ in range(cfg.num_res_blocks[level] - 1)]
            after = Downsample(out_width, cfg.resample) if not cfg.memory_efficient and not last else None
            levels.append(Level(blocks, self._attentions(level, out_width), before, after))
            skip_widths.append([out_width] * cfg.num_res_blocks[level])
            width = out_width
        return levels, skip_widths

    def _build_up(self, widths: tuple[int, ...], skip_widths: list[list[int]]) -> nn.ModuleList:
        """Up path, lowest resolution first; every residual block takes one skip feature concatenated to its input."""
        cfg = self.config
        levels = nn.ModuleList()
        width = widths[-1]
        for level in reversed(range(len(widths))):
            out_width = widths[level]
            last = level == len(widths) - 1
            before = Upsample(width, cfg.resample) if not cfg.memory_efficient and not last else None
            blocks = []
            for skip_width in skip_widths[level]:
                blocks.append(self._resblock(width + skip_width, out_width))
                width = out_width
            after = Upsample(out_width, cfg.resample) if cfg.memory_efficient else None
            levels.append(Level(blocks, self._attentions(level, out_width), before, after))
        return levels

    def _resblock(self, in_ch: int, out_ch: int) -> ResBlock:
        cfg = self.config
        return ResBlock(in_ch, out_ch, cfg.cond_dim, cfg.norm_groups, cfg.dropout, cfg.scale_skip)

    def _attention(self, level: int, width: int) -> AttentionBlock | None:
        cfg = self.config
        if not (cfg.self_attention[level] or cfg.cross_attention[level]):
            return None
        return AttentionBlock(
            width, cfg.text_embed_dim, cfg.attention_head_dim, cfg.norm_groups,
            self_attend=cfg.self_attention[level], ff_mult=cfg.attention_ff_mult,
        )

    def _attentions(self, level: int, width: int) -> list[AttentionBlock] | None:
        """One attention layer per residual block of the level, or one for the whole level."""
        cfg = self.config
        if not (cfg.self_attention[level] or cfg.cross_attention[level]):
            return None
        count = cfg.num_res_blocks[level] if cfg.attention_every_block else 1
        return [self._attention(level, width) for _ in range(count)]

    def _call(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        """Run a block, recomputing it in backward when activation checkpointing is on."""
        if self.config.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _run_level(self, level: Level, h: torch.Tensor, cond: torch.Tensor, text: torch.Tensor,
                   text_mask: torch.Tensor, skips: list[torch.Tensor], down: bool) -> torch.Tensor:
        """Down: push each block's output onto `skips`. Up: pop one skip and concatenate it before each block."""
        if level.resample_before is not None:
            h = level.resample_before(h)
        for i, block in enumerate(level.resblocks):
            if not down:
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._call(block, h, cond)
            attention = level.attention_after(i)
            if attention is not None:
                h = self._call(attention, h, text, text_mask)
            if down:
                skips.append(h)
        if level.resample_after is not None:
            h = level.resample_after(h)
        return h

    def forward(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        lowres: torch.Tensor | None = None,
        lowres_logsnr: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict eps (or v) for x_t (B, C, H, W) at noise level `logsnr` (B,), conditioned on text (B, L, D) with
        its mask (B, L), and for a super-resolution net on `lowres` (B, C, h, w), noised at `lowres_logsnr` (B,).

        H = W = image_size normally; being convolutional, the net also runs on other multiples of
        2**num_downsamples, as the 256->1024 stage trained on 64->256 crops (App. F). `lowres` is upsampled
        bilinearly to x's size."""
        self._check_inputs(x, logsnr, text_embeds, text_mask, lowres, lowres_logsnr)
        text_mask = text_mask.bool()
        x, noise, text_embeds, lowres, lowres_noise = self._network_inputs(
            x, logsnr, text_embeds, lowres, lowres_logsnr
        )
        cond = self.noise_embed(noise) + self.text_pool(text_embeds, text_mask)
        h = x
        if self.lowres_noise_embed is not None:
            cond = cond + self.lowres_noise_embed(lowres_noise)
            if lowres.shape[-1] != x.shape[-1]:
                lowres = F.interpolate(lowres, size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([x, lowres], dim=1)
        text = self.text_norm(text_embeds)

        # NHWC (channels_last) from the input convolution on: oneDNN's CPU convolutions (forward and backward, the
        # largest cost after attention) run NHWC without reordering around each call; GroupNorm, SiLU, cat and
        # nearest upsampling keep the layout, and an attention block's (B, HW, C) view of an NHWC map is free.
        # Same maths, another memory order (bench/bench_peer.py: the base64 step 0.82 -> 0.75 s).
        h = self.input_conv(h.contiguous(memory_format=torch.channels_last))
        full_res = h
        skips: list[torch.Tensor] = []
        for level in self.down:
            h = self._run_level(level, h, cond, text, text_mask, skips, down=True)
        h = self._call(self.mid_block1, h, cond)
        if self.mid_attention is not None:
            h = self._call(self.mid_attention, h, text, text_mask)
        h = self._call(self.mid_block2, h, cond)
        for level in self.up:
            h = self._run_level(level, h, cond, text, text_mask, skips, down=False)
        if self.full_res_block is not None:
            h = self._call(self.full_res_block, torch.cat([h, full_res], dim=1), cond)
        return self.out_conv(F.silu(self.out_norm(h))).contiguous()  # callers get the usual NCHW tensor

    def _network_inputs(
        self,
        x: torch.Tensor,
        logsnr: torch.Tensor,
        text_embeds: torch.Tensor,
        lowres: torch.Tensor | None,
        lowres_logsnr: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Everything that enters the network, in the weights' dtype: x_t, the Fourier features of both noise
        levels, the text embeddings and the low-res image.

        The one place where inputs meet the weights' dtype. Mixed precision here means bf16 (or fp16) weights,
        as DeepSpeed's bf16/fp16 engines or `module.to(torch.bfloat16)` leave them, with no autocast: DeepSpeed
        casts the weights but not the inputs, the stage keeps the diffusion maths around the network in fp32
        (x_t = alpha * x0 + sigma * eps, the targets, the samplers' state), and text embeddings arrive in
        whatever dtype they were stored in (fp16 in the embed step's Parquet). Without this cast fp32 x_t met
        bf16 weights ("mixed dtype (CPU): expect parameter to have scalar type of Float" in the first norm).
        The log-SNR itself stays fp32 up to its Fourier features (angles up to 30 * 2 pi / 0.5 need fp32);
        only the features are cast. The output is in the weights' dtype; the stage casts it back to fp32.
        """
        dtype = self.input_conv.weight.dtype
        noise = fourier_embedding(logsnr, self.noise_embed.fourier_dim).to(dtype)
        lowres_noise = None
        if self.lowres_noise_embed is not None:
            lowres_noise = fourier_embedding(lowres_logsnr, self.lowres_noise_embed.fourier_dim).to(dtype)
        lowres = lowres.to(dtype) if lowres is not None else None
        return x.to(dtype), noise, text_embeds.to(dtype), lowres, lowres_noise

    def _check_inputs(self, x: torch.Tensor, logsnr: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                      lowres: torch.Tensor | None, lowres_logsnr: torch.Tensor | None) -> None:
        cfg = self.config
        batch = x.shape[0]
        factor = 2**cfg.num_downsamples
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x must be (B, {cfg.in_channels}, H, W) with H and W multiples of {factor} (usually "
                f"{cfg.image_size}; other sizes serve crop training, App. F), got {tuple(x.shape)}"
            )
        if logsnr.shape != (batch,):
            raise ValueError(f"logsnr must be one value per sample, shape ({batch},), got {tuple(logsnr.shape)}")
        if text_embeds.ndim != 3 or text_embeds.shape[0] != batch or text_embeds.shape[2] != cfg.text_embed_dim:
            raise ValueError(
                f"text_embeds must be (B={batch}, L, {cfg.text_embed_dim}), got {tuple(text_embeds.shape)}"
            )
        if text_mask.shape != text_embeds.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text_embeds.shape[:2])}, got {tuple(text_mask.shape)}")
        if cfg.lowres_cond:
            if lowres is None or lowres_logsnr is None:
                raise ValueError("this is a super-resolution U-Net (lowres_cond=True): pass lowres and lowres_logsnr")
            if lowres.ndim != 4 or lowres.shape[:2] != (batch, cfg.in_channels) or lowres.shape[-1] > x.shape[-1]:
                raise ValueError(
                    f"lowres must be (B={batch}, {cfg.in_channels}, h, w) no larger than x {tuple(x.shape[-2:])}, "
                    f"got {tuple(lowres.shape)}"
                )
            if lowres_logsnr.shape != (batch,):
                raise ValueError(f"lowres_logsnr must have shape ({batch},), got {tuple(lowres_logsnr.shape)}")
        elif lowres is not None or lowres_logsnr is not None:
            raise ValueError("this U-Net has lowres_cond=False: do not pass lowres / lowres_logsnr")
