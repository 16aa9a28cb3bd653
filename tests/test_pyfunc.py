"""The registered pyfunc models: a cascade resolved by alias returns PNGs of its size, deterministic per seed,
and loading unpickles nothing (pickle and cloudpickle loads patched to raise)."""
from __future__ import annotations

import io
import pickle

import cloudpickle
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.registry.images import png_bytes
from pipelines.registry.promote import promote
from pipelines.registry.register import CascadeSpec, RegisterConfig, register_cascade, register_stage
from test_registry_common import use_registry

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, registry) are shared

NAME = "pyf"


@pytest.fixture(scope="module")
def cascade_uri(sqlite_registry, stage_dirs) -> str:
    use_registry(sqlite_registry)
    config = RegisterConfig(experiment="registry-tests", metrics=(("eval_loss", 1.0),))
    register_stage(stage_dirs["base_trained"], NAME, config)
    register_stage(stage_dirs["sr"], NAME, config)
    promote(NAME, "base", "eval_loss")
    promote(NAME, "sr1", "eval_loss")
    register_cascade(NAME, CascadeSpec(stages=("base", "sr1"), steps=2), RegisterConfig(experiment="registry-tests"))
    return f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def cascade_model(cascade_uri):
    return mlflow.pyfunc.load_model(cascade_uri)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_cascade_returns_pngs_of_the_configured_size(registry, cascade_model):
    out = cascade_model.predict(pd.DataFrame({"prompt": ["a red square on a blue background", "a green star"]}))
    assert list(out.columns) == ["image", "width", "height", "seed"]
    for png, width, height in zip(out["image"], out["width"], out["height"]):
        with Image.open(io.BytesIO(png)) as image:
            assert image.format == "PNG" and image.size == (16, 16) == (width, height)


def test_same_seed_same_image_and_rows_are_independent(registry, cascade_model):
    frame = pd.DataFrame({"prompt": ["a red square", "a red square", "a blue circle"], "seed": [3, 4, 3],
                          "steps": [2, 2, 2], "sampler": ["ddim", "ddim", "ddim"], "guidance": [1.5, 1.5, 1.5]})
    first, second = cascade_model.predict(frame), cascade_model.predict(frame.iloc[[0]])
    assert first["image"][0] == second["image"][0]  # same row alone or in a batch: same bytes
    assert first["image"][0] != first["image"][1]  # another seed
    assert first["image"][0] != first["image"][2]  # another prompt
    ancestral = cascade_model.predict(frame.iloc[[0]].assign(sampler="ancestral"))
    assert ancestral["image"][0] != first["image"][0]


def test_super_resolution_stage_model_upsamples_an_input_png(registry, cascade_uri):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}-sr1@champion")
    lowres = png_bytes(torch.rand(3, 8, 8) * 2 - 1)
    out = model.predict(pd.DataFrame({"prompt": ["a red square"], "image": [lowres], "seed": [0]}))
    assert (out["width"][0], out["height"][0]) == (16, 16)
    assert _pixels(out["image"][0]).shape == (16, 16, 3)


def test_loading_and_predicting_unpickle_nothing(registry, cascade_uri, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle while loading a registered model")

    for module, attr in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads"),
                         (torch, "load")):
        monkeypatch.setattr(module, attr, refuse)
    with pytest.raises(AssertionError, match="tried to unpickle"):  # the patch is live
        cloudpickle.loads(cloudpickle.dumps(1))
    cascade = mlflow.pyfunc.load_model(cascade_uri)
    stage = mlflow.pyfunc.load_model(f"models:/{NAME}-base@champion")
    frame = pd.DataFrame({"prompt": ["a yellow star"], "seed": [1]})
    assert cascade.predict(frame)["width"][0] == 16
    assert stage.predict(frame)["width"][0] == 8
