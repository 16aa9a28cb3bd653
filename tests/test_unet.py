"""The U-Net: shapes, gradients, text masking, activation checkpointing, config checks, paper sizes."""
import dataclasses
import json

import pytest
import torch

from imagen_core import recipes
from imagen_core.unet import EfficientUNet, UNetConfig, fourier_embedding

torch.set_num_threads(1)


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Replace every weight (zero-initialised ones included) by noise, so every path influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _inputs(cfg: UNetConfig, batch: int = 2, tokens: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.arange(batch) % (tokens - 1) + tokens // 2  # real tokens per sample, varied
    mask = torch.arange(tokens)[None] < lengths[:, None]
    inputs = {
        "x": torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen),
        "logsnr": torch.randn(batch, generator=gen) * 5,
        "text_embeds": torch.randn(batch, tokens, cfg.text_embed_dim, generator=gen),
        "text_mask": mask,
    }
    if cfg.lowres_cond:
        low = cfg.image_size // 2
        inputs["lowres"] = torch.randn(batch, cfg.in_channels, low, low, generator=gen)
        inputs["lowres_logsnr"] = torch.randn(batch, generator=gen) * 3
    return inputs


TINY_CONFIGS = {
    "base": recipes.unet_tiny, "sr": recipes.unet_tiny_sr,
    "sr_pixel_shuffle": lambda: dataclasses.replace(recipes.unet_tiny_sr(), resample="pixel_shuffle"),
    "base_pixel_shuffle": lambda: dataclasses.replace(recipes.unet_tiny(), resample="pixel_shuffle"),
}


def test_untrained_net_predicts_zero() -> None:
    """The final convolution is zero-initialised."""
    cfg = recipes.unet_tiny()
    out = EfficientUNet(cfg)(**_inputs(cfg))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_forward_backward_shape_and_gradients(name: str) -> None:
    cfg = TINY_CONFIGS[name]()
    net = EfficientUNet(cfg)
    _randomize(net)
    inputs = _inputs(cfg)
    out = net(**inputs)
    assert out.shape == inputs["x"].shape
    out.square().mean().backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    no_grad = [n for n, g in grads.items() if torch.count_nonzero(g) == 0]
    assert no_grad == [], f"parameters that get no gradient: {no_grad}"


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_masked_text_tokens_do_not_change_the_output(name: str) -> None:
    cfg = TINY_CONFIGS[name]()
    net = EfficientUNet(cfg).eval()
    _randomize(net)
    inputs = _inputs(cfg)
    with torch.no_grad():
        reference = net(**inputs)
        padding = ~inputs["text_mask"]
        assert padding.any()
        noise = 100 * torch.randn_like(inputs["text_embeds"])
        padded = dict(inputs, text_embeds=torch.where(padding[..., None], noise, inputs["text_embeds"]))
        assert torch.allclose(net(**padded), reference, atol=1e-6, rtol=0)
        visible = dict(inputs, text_embeds=inputs["text_embeds"].clone())
        visible["text_embeds"][:, 1] = torch.randn_like(visible["text_embeds"][:, 1])  # a real token: the output
        # must move, so the check above is not vacuous
        assert (net(**visible) - reference).abs().max() > 1e-3


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    cfg = recipes.unet_tiny_sr()
    plain = EfficientUNet(cfg)
    _randomize(plain)
    checkpointed = EfficientUNet(dataclasses.replace(cfg, activation_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    inputs = _inputs(cfg)
    losses = []
    for net in (plain, checkpointed):
        loss = net(**inputs).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_lowres_is_upsampled_and_changes_the_output() -> None:
    cfg = recipes.unet_tiny_sr()
    net = EfficientUNet(cfg).eval()
    _randomize(net)
    inputs = _inputs(cfg)
    with torch.no_grad():
        a = net(**inputs)
        b = net(**dict(inputs, lowres=inputs["lowres"] + 0.5))
        c = net(**dict(inputs, lowres_logsnr=inputs["lowres_logsnr"] + 2.0))
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_super_resolution_net_runs_on_crops() -> None:
    """The 256->1024 stage trains on 64->256 crops (App. F): the net is convolutional, image_size is nominal."""
    cfg = recipes.unet_tiny_sr()
    net = EfficientUNet(cfg)
    inputs = _inputs(cfg)
    inputs["x"], inputs["lowres"] = inputs["x"][..., :8, :12], inputs["lowres"][..., :4, :6]
    assert net(**inputs).shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match="multiples of 4"):
        net(**dict(inputs, x=inputs["x"][..., :6, :]))


def test_infinite_logsnr_is_accepted() -> None:
    """log-SNR +inf (no noise: t=0, augmentation level 0) embeds to finite features."""
    features = fourier_embedding(torch.tensor([float("inf"), -float("inf"), 0.0]), 32)
    assert torch.isfinite(features).all()


def test_bad_inputs_fail_with_clear_messages() -> None:
    sr = EfficientUNet(recipes.unet_tiny_sr())
    inputs = _inputs(sr.config)
    with pytest.raises(ValueError, match="pass lowres and lowres_logsnr"):
        sr(**dict(inputs, lowres=None))
    base = EfficientUNet(recipes.unet_tiny())
    with pytest.raises(ValueError, match="lowres_cond=False"):
        base(**inputs)
    with pytest.raises(ValueError, match="text_embeds must be"):
        base(**dict(_inputs(base.config), text_embeds=torch.zeros(2, 6, 7)))


def test_config_validation_messages() -> None:
    good = recipes.unet_tiny()
    with pytest.raises(ValueError, match="num_res_blocks must be a tuple with one entry per level"):
        dataclasses.replace(good, num_res_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="self_attention must be a tuple"):
        dataclasses.replace(good, self_attention=[False, True])
    with pytest.raises(ValueError, match="image_size 18 must be divisible by 2\\*\\*2"):
        dataclasses.replace(good, image_size=18, memory_efficient=True)
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        dataclasses.replace(good, base_channels=12)
    with pytest.raises(ValueError, match="one channel per group"):
        dataclasses.replace(good, norm_groups=16)
    with pytest.raises(ValueError, match="attention_head_dim"):
        dataclasses.replace(good, attention_head_dim=24)


def test_config_dict_round_trip_through_json() -> None:
    for make in (recipes.unet_tiny_sr, recipes.unet_paper_base_2b):
        cfg = make()
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown UNetConfig fields \\['widht'\\]"):
        UNetConfig.from_dict({**recipes.unet_tiny().to_dict(), "widht": 3})


def _meta_count(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return recipes.count_parameters(EfficientUNet(cfg))


@pytest.mark.parametrize(
    ("make", "paper"),
    [
        (recipes.unet_paper_base_2b, 2.0e9),
        (recipes.unet_paper_sr256_600m, 600e6),
        (recipes.unet_paper_sr1024_400m, 400e6),
    ],
)
def test_paper_recipes_match_paper_sizes(make, paper: float) -> None:
    count = _meta_count(make())
    print(f"{make.__name__}: {count:,} parameters ({count / paper - 1:+.1%} vs paper {paper:,.0f})")
    assert abs(count / paper - 1) <= 0.10


def test_small_recipes_sizes() -> None:
    counts = {make.__name__: _meta_count(make()) for make in
              (recipes.unet_tiny, recipes.unet_tiny_sr, recipes.unet_demo_base, recipes.unet_demo_sr)}
    print(counts)
    assert 100_000 <= counts["unet_tiny"] <= 500_000
    assert 100_000 <= counts["unet_tiny_sr"] <= 500_000
    assert counts["unet_demo_base"] < 10_000_000 and counts["unet_demo_sr"] < 10_000_000


def test_pixel_shuffle_resampling_starts_as_nearest_and_costs_less() -> None:
    """resample="pixel_shuffle": ICNR-initialised, the upsampler is a 1x1 convolution (and SiLU) followed by a
    nearest x2 (no checkerboard at the start); the downsampler sees every pixel of each 2x2 patch; both hold
    fewer parameters than the 3x3 convolutions they replace."""
    import torch.nn.functional as F

    from imagen_core.unet import Downsample, Upsample

    x = torch.randn(2, 8, 5, 7)
    up = Upsample(8, "pixel_shuffle")
    conv = F.conv2d(x, up.conv.weight[::4], up.conv.bias[::4])
    torch.testing.assert_close(up(x), F.interpolate(F.silu(conv), scale_factor=2.0, mode="nearest"))
    down = Downsample(8, "pixel_shuffle")
    y = torch.randn(2, 8, 10, 14)
    assert down(y).shape == (2, 8, 5, 7)
    moved = y.clone()
    moved[..., 1::2, 1::2] += 1.0  # only the bottom-right pixel of each patch changes
    assert not torch.allclose(down(moved), down(y))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(up) < count(Upsample(8)) and count(down) < count(Downsample(8))
    with pytest.raises(ValueError, match="resample must be 'conv' or 'pixel_shuffle'"):
        dataclasses.replace(recipes.unet_tiny(), resample="bilinear")
