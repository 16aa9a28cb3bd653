"""Text encoders: the shipped tiny T5 (imagen_core/assets/tiny-t5, made by make_tiny_t5.py) and a tiny
registered open_clip config, both offline on CPU (conftest sets HF_HUB_OFFLINE=1)."""
import json
import pathlib
import time

import open_clip
import pytest
import torch

from imagen_core.recipes import TINY_T5_DIR
from imagen_core.text_encoder import (
    TextEncoderConfig,
    TextEncoderWeightsError,
    build_text_encoder,
    resolve_dtype,
)

CAPTIONS = [
    "a red circle at the top left on a blue background",
    "a star",
    "",
    "two small yellow squares and a large green triangle in the bottom right on a black background",
    "A photo of an astronaut riding a horse!",
]
# fp32 with different padding runs different matmul shapes: equal to rounding, not bit for bit.
PAD_ATOL = 1e-5


def tiny_t5_dir() -> pathlib.Path:
    """The shipped tiny T5 (vocab 591, d_model 64); regenerate with imagen_core/assets/make_tiny_t5.py."""
    return TINY_T5_DIR


@pytest.fixture(scope="module")
def t5():
    torch.set_num_threads(1)
    return build_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir()), batch_size=2), "cpu")


def test_tiny_t5_loads_frozen_in_fp32(t5):
    assert t5.embed_dim == 64
    assert not t5.model.training
    assert not any(p.requires_grad for p in t5.model.parameters())
    assert len(t5.tokenizer) == 591


def test_t5_encode_shapes_and_mask(t5):
    counts = t5.token_counts(CAPTIONS)
    assert counts[2] == 1  # the empty caption is just </s>
    embeds, mask = t5.encode(CAPTIONS)
    assert embeds.shape == (len(CAPTIONS), max(counts), 64)
    assert embeds.dtype == torch.float32 and mask.dtype == torch.bool
    assert not embeds.requires_grad
    assert mask.sum(1).tolist() == counts
    for row, n in enumerate(counts):  # real tokens form a prefix
        assert mask[row, :n].all() and not mask[row, n:].any()
    assert mask[:, 0].all()
    assert (embeds[~mask] == 0).all()
    assert embeds[mask].abs().sum(-1).gt(0).all()


def test_t5_padding_does_not_leak(t5):
    short = CAPTIONS[1]
    alone, alone_mask = t5.encode([short])
    batched, _ = t5.encode([CAPTIONS[3], short, CAPTIONS[0]])
    n = alone_mask.sum().item()
    assert batched.shape[1] > n  # the short caption really was padded
    torch.testing.assert_close(batched[1, :n], alone[0], atol=PAD_ATOL, rtol=0)


def test_t5_encode_batched_keeps_order_and_lengths(t5):
    per_caption = t5.encode_batched(CAPTIONS)  # batch_size=2: three length-sorted batches
    counts = t5.token_counts(CAPTIONS)
    assert [e.shape for e in per_caption] == [(n, 64) for n in counts]
    for caption, embeds in zip(CAPTIONS, per_caption):
        alone, _ = t5.encode([caption])
        torch.testing.assert_close(embeds, alone[0], atol=PAD_ATOL, rtol=0)


def test_t5_different_captions_differ(t5):
    embeds, _ = t5.encode(["a red circle", "a blue square"])
    assert (embeds[0] - embeds[1]).abs().max() > 1e-2


def test_t5_truncates_to_max_length_keeping_eos():
    encoder = build_text_encoder(TextEncoderConfig(name=str(tiny_t5_dir()), max_length=6), "cpu")
    (count,) = encoder.token_counts([CAPTIONS[3]])
    assert count == 6
    assert encoder._token_ids([CAPTIONS[3]])[0][-1] == encoder.tokenizer.eos_token_id
    embeds, mask = encoder.encode([CAPTIONS[3], "a star"])
    assert embeds.shape == (2, 6, 64) and mask[0].all()


def _assert_fast_weights_error(config: TextEncoderConfig, expected_in_message: str):
    start = time.perf_counter()
    with pytest.raises(TextEncoderWeightsError) as caught:
        build_text_encoder(config, "cpu")
    assert time.perf_counter() - start < 3.0
    assert expected_in_message in str(caught.value)
    return str(caught.value)


def test_t5_missing_local_directory_fails_fast(tmp_path):
    missing = str(tmp_path / "no-such-t5")
    message = _assert_fast_weights_error(TextEncoderConfig(name=missing), missing)
    assert "TextEncoderConfig.name" in message and "HF_HOME" in message


def test_t5_uncached_hub_name_fails_fast_offline():
    _assert_fast_weights_error(TextEncoderConfig(name="imagen-tests/no-such-t5"), "imagen-tests/no-such-t5")


def test_t5_directory_without_weights_fails(tmp_path):
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "config.json"):
        (tmp_path / name).write_bytes((tiny_t5_dir() / name).read_bytes())
    _assert_fast_weights_error(TextEncoderConfig(name=str(tmp_path)), str(tmp_path))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        TextEncoderConfig(kind="bert")
    with pytest.raises(ValueError, match="pretrained"):
        TextEncoderConfig(kind="t5", pretrained="openai")
    with pytest.raises(ValueError, match="max_length"):
        TextEncoderConfig(max_length=1)
    with pytest.raises(ValueError, match="dtype"):
        TextEncoderConfig(dtype="int8")


def test_encode_rejects_bad_captions(t5):
    with pytest.raises(TypeError, match="one string"):
        t5.encode("a red circle")
    with pytest.raises(ValueError, match="empty"):
        t5.encode([])


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


# ------------------------------------------------------------------------------------ open_clip

TINY_CLIP = "imagen-test-tiny-clip"
TINY_CLIP_BIDIRECTIONAL = "imagen-test-tiny-clip-bidirectional"


@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    """Register tiny CLIP configs (a 2-layer, 32-wide text tower with CLIP's tokenizer)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    vision_cfg = {"image_size": 32, "patch_size": 16, "width": 32, "head_width": 16, "layers": 1}
    for name, extra in ((TINY_CLIP, {}), (TINY_CLIP_BIDIRECTIONAL, {"no_causal_mask": True})):
        config = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": {**text_cfg, **extra}}
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return TINY_CLIP


@pytest.fixture(scope="module")
def clip_reference(tiny_clip_name, tmp_path_factory):
    """A seeded tiny CLIP and its state_dict saved where `pretrained` can point."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_clip_name).eval()
    path = tmp_path_factory.mktemp("clip_ckpt") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_open_clip_random_init_shapes_and_mask(tiny_clip_name):
    encoder = build_text_encoder(TextEncoderConfig(kind="open_clip", name=tiny_clip_name), "cpu")
    assert encoder.embed_dim == 32 and encoder.max_length == 77  # 128 capped at the context length
    counts = encoder.token_counts(CAPTIONS)
    assert counts[2] == 2  # <start_of_text> <end_of_text>
    embeds, mask = encoder.encode(CAPTIONS)
    assert embeds.shape == (len(CAPTIONS), max(counts), 32)
    assert mask.sum(1).tolist() == counts and mask[:, 0].all()
    assert (embeds[~mask] == 0).all()
    per_caption = encoder.encode_batched(CAPTIONS)
    assert [e.shape[0] for e in per_caption] == counts


def test_open_clip_tokens_match_library_encode_text(clip_reference):
    """Our cut-to-L causal pass equals open_clip's full 77-token pass: every real token's output
    after ln_final, and at EOT the vector encode_text pools before its projection."""
    reference, checkpoint = clip_reference
    encoder = build_text_encoder(
        TextEncoderConfig(kind="open_clip", name=TINY_CLIP, pretrained=str(checkpoint)), "cpu")
    embeds, mask = encoder.encode(CAPTIONS)

    tokens = open_clip.get_tokenizer(TINY_CLIP)(CAPTIONS)  # (B, 77), padded as the library does
    captured = {}
    hook = reference.ln_final.register_forward_hook(lambda m, i, out: captured.update(full=out))
    with torch.no_grad():
        projected = reference.encode_text(tokens)
    hook.remove()
    full = captured["full"][:, :embeds.shape[1]]
    torch.testing.assert_close(embeds[mask], full[mask], atol=1e-5, rtol=0)

    eot = mask.sum(1) - 1
    assert eot.tolist() == tokens.argmax(-1).tolist()  # CLIP pools at the EOT (highest id) token
    pooled = embeds[torch.arange(len(CAPTIONS)), eot]
    unprojected = reference.text_projection
    reference.text_projection = None  # now encode_text returns the pooled vector itself
    try:
        with torch.no_grad():
            library_pooled = reference.encode_text(tokens)
    finally:
        reference.text_projection = unprojected
    torch.testing.assert_close(pooled, library_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled @ unprojected, projected, atol=1e-5, rtol=0)


def test_open_clip_missing_checkpoint_fails_fast(tiny_clip_name, tmp_path):
    missing = str(tmp_path / "missing.pt")
    config = TextEncoderConfig(kind="open_clip", name=tiny_clip_name, pretrained=missing)
    message = _assert_fast_weights_error(config, tiny_clip_name)
    assert missing in message and "TextEncoderConfig.pretrained" in message


def test_open_clip_known_tag_offline_fails_fast():
    config = TextEncoderConfig(kind="open_clip", name="ViT-B-32", pretrained="openai")
    _assert_fast_weights_error(config, "ViT-B-32")


def test_open_clip_unknown_and_unsupported_models(tiny_clip_name):
    with pytest.raises(ValueError, match="no architecture"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", name="no-such-arch"), "cpu")
    with pytest.raises(ValueError, match="bidirectional"):
        build_text_encoder(TextEncoderConfig(kind="open_clip", name=TINY_CLIP_BIDIRECTIONAL), "cpu")
