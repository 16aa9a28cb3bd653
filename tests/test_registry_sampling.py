"""sample_images / upscale from local checkpoint directories, with progress, PNG output and the safety check."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.registry.images import from_pil
from pipelines.registry.safety import SafetyChecker, SafetyConfig, safety_check
from pipelines.registry.sampling import SampleConfig, sample_images, upscale

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, registry) are shared


def test_sample_images_writes_pngs_deterministically_with_progress(stage_dirs, tmp_path):
    source = [stage_dirs["base_trained"], stage_dirs["sr"]]
    calls = []
    config = SampleConfig(sampler="ddim", steps=2, guidance=2.0, seed=5)
    first = sample_images(source, ["a red square", "a blue star"], config, out_dir=tmp_path / "a",
                          progress=lambda stage, i, n: calls.append((stage, i, n)))
    again = sample_images(source, ["a red square", "a blue star"], config, out_dir=tmp_path / "b")
    assert calls == [("base", 1, 2), ("base", 2, 2), ("sr1", 1, 2), ("sr1", 2, 2)]
    for a, b in zip(first, again):
        assert a.path.name == b.path.name and a.path.read_bytes() == b.path.read_bytes()
        assert Image.open(a.path).size == (16, 16) and a.withheld is None
    with pytest.raises(TypeError, match="list of strings"):
        sample_images(source, "a red square", config)


def test_upscale_with_the_super_resolution_stage_alone(stage_dirs, tmp_path):
    lowres = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    lowres.save(tmp_path / "in.png")
    out = upscale(stage_dirs["sr"], tmp_path / "in.png", tmp_path / "up.png", prompt="a red square",
                  config=SampleConfig(steps=2, aug_level=0.0))
    upscaled = Image.open(out.path)
    assert upscaled.size == (16, 16)
    # the trained SR stage follows its input: the output's 8x8 average is closer to the input than noise is
    down = from_pil(upscaled.resize((8, 8), Image.Resampling.BOX))
    target = from_pil(lowres)
    assert (down - target).abs().mean() < (torch.rand_like(target) * 2 - 1 - target).abs().mean()
    with pytest.raises(ValueError, match="no super-resolution stage"):
        upscale(stage_dirs["base"], tmp_path / "in.png")


def test_safety_check_flags_the_concept_and_sampling_withholds_flagged_images(stage_dirs, tiny_clip, tmp_path):
    clip_config, images, captions = tiny_clip
    checker = SafetyChecker(
        SafetyConfig(clip=clip_config, unsafe_concepts=(captions[0],), safe_concepts=tuple(captions[1:]))
    )
    batch = torch.cat([from_pil(images[0]), from_pil(images[1])])
    flags = safety_check(batch, checker.clip, (captions[0],), tuple(captions[1:]))
    print("safety margins:", [f and round(f.margin, 3) for f in flags])
    assert flags[0] is not None and flags[0].concept == captions[0] and flags[1] is None

    strict = SafetyChecker(SafetyConfig(clip=clip_config, margin=-2.0))  # curation's concepts; flags everything
    outputs = sample_images([stage_dirs["base_trained"]], ["a red square"], SampleConfig(steps=2), out_dir=tmp_path,
                            safety=strict)
    assert outputs[0].image is None and outputs[0].path is None and not list(tmp_path.glob("*.png"))
    assert outputs[0].withheld.startswith("withheld by the safety check: closest to unsafe concept")
