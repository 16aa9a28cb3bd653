"""The package works away from its checkout: shipped assets, carried text encoders, provenance without git.

Fast: the tiny recipes name the T5 shipped in the package (`imagen-asset:tiny-t5`); a stage whose encoder is a
local directory or file carries it (`text_encoder/` in the checkpoint, sha256-recorded, named `checkpoint:...`)
and loads after the checkpoint is moved and the source deleted, from another working directory; a damaged carried
file is refused; two stages carrying the demo-style CLIP tower share one loaded encoder; registration carries what
an export did not; the git commit comes from $IMAGEN_GIT_COMMIT or the installed package's record and never fails
outside a checkout.

Slow: a non-editable install of a copy of this tree into a fresh virtual environment (dependencies reused from
.venv through a .pth file, the checkout nowhere on sys.path) trains the tiny stage with the installed `imagen`
console script from a temporary directory, registers the export and samples it back by its models:/ URI; then,
with the training output and the encoder's source deleted, another process in another directory loads the
registered model with mlflow.pyfunc and samples it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from imagen_core.checkpoint import (
    ENCODER_FILES_KEY,
    ENCODER_SOURCE_KEY,
    CheckpointError,
    carry_text_encoder,
    read_manifest,
    resolve_text_encoder,
    save_checkpoint,
)
from imagen_core.diffusion.samplers import SamplerConfig
from imagen_core.recipes import TINY_T5_DIR, paper_text_encoder, stage_tiny_base
from imagen_core.stage import DiffusionStage
from imagen_core.text_encoder import (
    ASSETS_DIR,
    TextEncoderConfig,
    TextEncoderWeightsError,
    asset_path,
    build_text_encoder,
)
from pipelines.registry import register
from pipelines.registry.checkpoints import copy_stage_files, load_stage, save_stage

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle on a blue background", "a green square"]


def tiny_stage(encoder: TextEncoderConfig) -> DiffusionStage:
    config = stage_tiny_base()
    config = dataclasses.replace(config, unet=dataclasses.replace(config.unet, image_size=8), text_encoder=encoder)
    torch.manual_seed(0)
    return DiffusionStage(config).eval()


def copy_of_tiny_t5(directory: pathlib.Path) -> pathlib.Path:
    shutil.copytree(TINY_T5_DIR, directory)
    (directory / ".cache").mkdir()  # what `hf download --local-dir` leaves: not carried
    (directory / ".cache" / "junk").write_text("x")
    return directory


# -- fast ---------------------------------------------------------------------------------------------------

def test_tiny_recipes_name_the_t5_shipped_in_the_package(tmp_path):
    encoder = stage_tiny_base().text_encoder
    assert encoder.name == "imagen-asset:tiny-t5"
    assert asset_path(encoder.name) == ASSETS_DIR / "tiny-t5" == TINY_T5_DIR
    assert (TINY_T5_DIR / "model.safetensors").is_file() and TINY_T5_DIR.parent.parent.name == "imagen_core"
    assert build_text_encoder(encoder).embed_dim == 64
    for bad in ("imagen-asset:no-such", "imagen-asset:../assets/tiny-t5", "imagen-asset:"):
        with pytest.raises(TextEncoderWeightsError, match="ships no encoder"):
            build_text_encoder(TextEncoderConfig(name=bad))
    assert not carry_text_encoder(save_checkpoint_dir(encoder, tmp_path)), "a shipped name travels as a name"


def save_checkpoint_dir(encoder: TextEncoderConfig, directory: pathlib.Path) -> pathlib.Path:
    save_checkpoint(directory, {"w": torch.zeros(2)}, {"text_encoder": dataclasses.asdict(encoder)})
    return directory


def test_local_t5_travels_inside_the_checkpoint_and_loads_after_a_move(tmp_path, monkeypatch):
    source = copy_of_tiny_t5(tmp_path / "models" / "my-t5")
    stage = tiny_stage(TextEncoderConfig(name=str(source), max_length=16))
    reference = build_text_encoder(stage.config.text_encoder).encode(CAPTIONS)[0]
    export = save_stage(stage, tmp_path / "export")

    manifest = read_manifest(export)
    assert manifest["config"]["text_encoder"]["name"] == "checkpoint:text_encoder"
    assert manifest[ENCODER_SOURCE_KEY] == {"name": str(source)}
    carried = manifest[ENCODER_FILES_KEY]
    assert sorted(carried) == sorted(f"text_encoder/{p.name}" for p in TINY_T5_DIR.iterdir())  # no .cache
    assert all(len(r["sha256"]) == 64 and (export / name).stat().st_size == r["bytes"] for name, r in carried.items())
    assert str(tmp_path) not in (export / "config.json").read_text().replace(str(source), ""), \
        "no absolute path in the config besides the provenance record"

    moved = tmp_path / "another-machine" / "stage"
    shutil.move(export, moved)
    shutil.rmtree(source)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_stage(moved)
    name = loaded.config.text_encoder.name
    assert pathlib.Path(name).is_relative_to(tmp_path / "cache") and pathlib.Path(name, "config.json").is_file()
    for key, value in stage.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(build_text_encoder(loaded.config.text_encoder).encode(CAPTIONS)[0], reference)
    assert load_stage(moved).config.text_encoder == loaded.config.text_encoder, "one directory per content"

    damaged = tmp_path / "damaged"
    shutil.copytree(moved, damaged)
    data = bytearray((damaged / "text_encoder" / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "text_encoder" / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "cache2"))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_stage(damaged)
    assert not any((tmp_path / "cache2" / "text-encoders").iterdir()), "nothing unverified is left in the cache"


def test_open_clip_folders_and_checkpoint_files_are_carried_in_their_form(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(b"weights")
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"same weights, pickled: left behind")
    local_dir = save_checkpoint_dir(TextEncoderConfig(kind="open_clip", name=f"local-dir:{folder}"), tmp_path / "a")
    assert carry_text_encoder(local_dir)
    assert read_manifest(local_dir)["config"]["text_encoder"]["name"] == "local-dir:checkpoint:text_encoder"
    assert sorted(read_manifest(local_dir)[ENCODER_FILES_KEY]) == [
        "text_encoder/open_clip_config.json", "text_encoder/open_clip_model.safetensors"]
    resolved = resolve_text_encoder(local_dir, read_manifest(local_dir)["config"], cache_dir=tmp_path / "cache")
    path = resolved["text_encoder"]["name"].removeprefix("local-dir:")
    assert resolved["text_encoder"]["name"].startswith("local-dir:/")
    assert pathlib.Path(path, "open_clip_model.safetensors").read_bytes() == b"weights"

    weights = tmp_path / "ViT-B-32.safetensors"
    weights.write_bytes(b"w")
    with_file = save_checkpoint_dir(TextEncoderConfig(kind="open_clip", name="ViT-B-32", pretrained=str(weights)),
                                    tmp_path / "b")
    assert carry_text_encoder(with_file)
    encoder = read_manifest(with_file)["config"]["text_encoder"]
    assert (encoder["name"], encoder["pretrained"]) == ("ViT-B-32", "checkpoint:text_encoder/ViT-B-32.safetensors")
    resolved = resolve_text_encoder(with_file, read_manifest(with_file)["config"], cache_dir=tmp_path / "cache")
    assert pathlib.Path(resolved["text_encoder"]["pretrained"]).read_bytes() == b"w"
    with pytest.raises(TextEncoderWeightsError, match="load_stage"):
        build_text_encoder(TextEncoderConfig(**encoder))  # unresolved: says how to load it

    for portable in (paper_text_encoder(), TextEncoderConfig(kind="open_clip", name="ViT-B-32", pretrained="openai")):
        directory = save_checkpoint_dir(portable, tmp_path / portable.kind)
        assert not carry_text_encoder(directory) and not (directory / "text_encoder").exists()


def tiny_clip_folder(directory: pathlib.Path) -> pathlib.Path:
    """An open_clip "local-dir:" folder as pipelines.clip_model.fit_tiny_clip writes it (random weights)."""
    import open_clip
    from safetensors.torch import save_file

    from pipelines.clip_model import CHECKPOINT_FILE, CONFIG_FILE, TINY_CLIP_CONFIG, register_tiny_clip

    torch.manual_seed(0)
    model = open_clip.create_model(register_tiny_clip())
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / CHECKPOINT_FILE))
    return directory


def test_demo_style_clip_tower_travels_and_one_encoder_serves_the_cascade(tmp_path, monkeypatch):
    """The demo's frozen encoder is its fitted CLIP's text tower, named "local-dir:<run>/clip": both stages carry
    it, and loaded elsewhere they resolve to one directory, so the cascade builds one encoder."""
    from imagen_core.cascade import Cascade
    from imagen_core.recipes import stage_tiny_sr

    folder = tiny_clip_folder(tmp_path / "run" / "clip")
    encoder = TextEncoderConfig(kind="open_clip", name=f"local-dir:{folder}", max_length=32)
    reference = build_text_encoder(encoder).encode(CAPTIONS)[0]
    base = save_stage(tiny_stage(encoder), tmp_path / "export" / "base")
    sr = stage_tiny_sr()
    sr = dataclasses.replace(sr, unet=dataclasses.replace(sr.unet, image_size=16), lowres_size=8, text_encoder=encoder)
    save_stage(DiffusionStage(sr).eval(), tmp_path / "export" / "sr1")
    assert read_manifest(base)["config"]["text_encoder"]["name"] == "local-dir:checkpoint:text_encoder"

    shutil.move(tmp_path / "export", tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("IMAGEN_CACHE_DIR", str(tmp_path / "cache"))
    stages = [load_stage(tmp_path / "elsewhere" / name) for name in ("base", "sr1")]
    assert stages[0].config.text_encoder == stages[1].config.text_encoder
    cascade = Cascade.from_stages(stages)
    assert len(cascade.encoders) == 1
    (loaded,) = cascade.encoders.values()
    assert torch.equal(loaded.encode(CAPTIONS)[0], reference)
    images = cascade.sample(["a red circle"], sampler=SamplerConfig(kind="ddim", steps=2))
    assert images[-1].shape == (1, 3, 16, 16)


def test_registration_carries_an_encoder_the_export_named_by_path(tmp_path):
    source = copy_of_tiny_t5(tmp_path / "my-t5")
    export = save_stage(tiny_stage(TextEncoderConfig(name=str(source), max_length=16)), tmp_path / "export",
                        carry_encoder=False)
    assert read_manifest(export)["config"]["text_encoder"]["name"] == str(source)
    staged = copy_stage_files(export, tmp_path / "registered")
    assert read_manifest(staged)["config"]["text_encoder"]["name"] == "checkpoint:text_encoder"
    assert (staged / "text_encoder" / "model.safetensors").is_file() and not (staged / "train.safetensors").exists()
    again = copy_stage_files(staged, tmp_path / "copied")  # a carried stage copies its encoder along
    assert read_manifest(again)[ENCODER_FILES_KEY] == read_manifest(staged)[ENCODER_FILES_KEY]
    assert (again / "text_encoder" / "spiece.model").is_file()


class FakeDistribution:
    def __init__(self, version: str, direct_url: dict | None = None):
        self.version, self._direct_url = version, direct_url

    def read_text(self, name: str) -> str | None:
        return json.dumps(self._direct_url) if name == "direct_url.json" and self._direct_url else None


def test_git_commit_comes_from_the_environment_or_the_package_and_never_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEN_GIT_COMMIT", "0123abcd")
    assert register.current_git_commit() == "0123abcd"
    monkeypatch.delenv("IMAGEN_GIT_COMMIT")

    vcs = {"url": "https://github.com/o/imagen", "vcs_info": {"vcs": "git", "commit_id": "feedbeef" * 5}}
    monkeypatch.setattr(register.importlib.metadata, "distribution", lambda name: FakeDistribution("0.1.0", vcs))
    assert register.current_git_commit() == "feedbeef" * 5  # pip install git+...@rev
    monkeypatch.setattr(register.importlib.metadata, "distribution",
                        lambda name: FakeDistribution("0.1.0+g1a2b3c4d5.d20261203"))
    assert register.current_git_commit() == "1a2b3c4d5"  # a setuptools-scm style version

    # An installed package (no checkout around it), even inside some other git repository: no git, no failure.
    subprocess.run(["git", "init", "-q", str(tmp_path / "outer")], check=True)
    site = tmp_path / "outer" / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(register, "REPO_ROOT", site)
    monkeypatch.setattr(register.importlib.metadata, "distribution", lambda name: FakeDistribution("0.1.0"))
    commit = register.current_git_commit()
    assert commit.startswith("unknown (imagen-cluster") and "IMAGEN_GIT_COMMIT" in commit

    def broken(name):
        raise OSError("unreadable metadata")

    monkeypatch.setattr(register.importlib.metadata, "distribution", broken)
    assert register.current_git_commit().startswith("unknown (")


# -- slow: a non-editable install away from the checkout -------------------------------------------------------

def _site_packages(python: pathlib.Path) -> pathlib.Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return pathlib.Path(out.stdout.strip())


def _copy_tree(destination: pathlib.Path) -> pathlib.Path:
    """The files git would ship (tracked, plus untracked not ignored): no .venv, no build outputs, no .git."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


CHECK_ISOLATION = """
import sys, pathlib, imagen_core, pipelines, jobs
checkout = pathlib.Path(sys.argv[1]).resolve()
venv = pathlib.Path(sys.prefix).resolve()
for module in (imagen_core, pipelines, jobs):
    where = pathlib.Path(module.__file__).resolve()
    assert where.is_relative_to(venv) and not where.is_relative_to(checkout / "imagen_core"), where
bad = [p for p in sys.path if p and pathlib.Path(p).resolve() == checkout]
assert not bad, bad
print("ISOLATED", imagen_core.__file__)
"""

REGISTER_AND_SAMPLE = """
import json, sys, mlflow, torch
from imagen_core.checkpoint import read_manifest
from imagen_core.diffusion.samplers import SamplerConfig
from pipelines.registry.loading import load_cascade
from pipelines.registry.register import RegisterConfig, register_stage
export, uri, artifacts = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
encoder = read_manifest(export)["config"]["text_encoder"]
version = register_stage(export, "portable", RegisterConfig(experiment="portable", artifact_location=artifacts))
mv = mlflow.MlflowClient().get_model_version("portable-base", version)
loaded = load_cascade("models:/portable-base@challenger", tracking_uri=uri)
images = loaded.cascade.sample(["a red circle"], sampler=SamplerConfig(kind="ddim", steps=3))[-1]
assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
print("RESULT" + json.dumps({"version": version, "encoder": encoder, "git_commit": mv.tags["git_commit"],
                             "sources": loaded.sources,
                             "loaded_encoder": loaded.cascade.stages[0].config.text_encoder.name}))
"""

LOAD_ELSEWHERE = """
import io, json, sys, pathlib, mlflow, pandas as pd
from PIL import Image
checkout = pathlib.Path(sys.argv[1]).resolve()
assert not any(p and pathlib.Path(p).resolve() == checkout for p in sys.path)
import imagen_core
assert not pathlib.Path(imagen_core.__file__).resolve().is_relative_to(checkout / "imagen_core")
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model("models:/portable-base@challenger")
out = model.predict(pd.DataFrame({"prompt": ["a green square"], "steps": [3], "seed": [1]}))
image = Image.open(io.BytesIO(out["image"][0]))
print("RESULT" + json.dumps({"size": list(image.size), "seed": int(out["seed"][0])}))
"""


def _run(argv: list[str], cwd: pathlib.Path, env: dict[str, str], timeout: int) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def _result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_copy_trains_registers_and_loads_away_from_the_checkout(tmp_path):
    from test_train_data import write_embed_shards

    # 1. A fresh venv that reuses .venv's packages (a .pth line: a plain path, so .venv's own .pth files, among
    #    them the editable finder of this checkout, are not run) and a non-editable install of a copy of the tree.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (_site_packages(python) / "_reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = _copy_tree(tmp_path / "main-copy")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "IMAGEN_"))}
    env.update(PATH=f"{venv / 'bin'}:{env.get('PATH', '')}", IMAGEN_CACHE_DIR=str(tmp_path / "cache"))
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
         tmp_path, env, 300)
    shutil.rmtree(source)  # nothing may read the tree it was built from
    work = tmp_path / "work"
    work.mkdir()
    assert "ISOLATED" in _run([str(python), "-c", CHECK_ISOLATION, str(ROOT)], work, env, 120)

    # 2. Train the tiny stage with the installed console script, from a temporary directory, with its text encoder
    #    a local directory (which the export must carry) and the DeepSpeed config by its shipped name.
    encoder_source = copy_of_tiny_t5(tmp_path / "encoder-source" / "tiny-t5")
    write_embed_shards(tmp_path / "embed", 48)
    out, uri = work / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    (work / "train.toml").write_text(textwrap.dedent(f"""\
        run_name = "portable"
        output_dir = "{out}"
        total_steps = 2
        [stage]
        recipe = "tiny_base"
        [stage.text_encoder]
        name = "{encoder_source}"
        max_length = 16
        [data]
        paths = ["{tmp_path / 'embed'}"]
        val_fraction = 0.15
        shuffle_buffer_rows = 16
        cpus_per_task = 0.25
        [optim]
        kind = "adamw"
        lr = 2e-3
        ema_every = 2
        [schedule]
        warmup_steps = 2
        [checkpoint]
        every_steps = 2
        storage_path = "{work / 'ray'}"
        [tracking]
        tracking_uri = "{uri}"
        log_every = 2
        val_every = 2
        sample_every = 2
        num_samples = 2
        sample_steps = 3
        [scaling]
        num_workers = 1
        cpus_per_worker = 0.5
        deepspeed_config = "zero2"
        micro_batch_size = 4
        """))
    _run([str(venv / "bin" / "imagen"), "train", "--config", "train.toml", "--num-cpus", "2"], work, env, 600)
    export = out / "export"
    assert read_manifest(export)["config"]["text_encoder"]["name"] == "checkpoint:text_encoder"
    resolved = json.loads((out / "deepspeed.json").read_text())
    assert resolved["zero_optimization"]["stage"] == 2

    # 3. Register the export and sample it back by its models:/ URI (the same installed package, same directory).
    result = _result(_run([str(python), "-c", REGISTER_AND_SAMPLE, str(export), uri, str(tmp_path / "artifacts")],
                          work, env, 300))
    assert result["encoder"]["name"] == "checkpoint:text_encoder"
    assert result["loaded_encoder"].startswith(str(tmp_path / "cache"))
    assert result["git_commit"].startswith("unknown (imagen-cluster 0.1.0"), result["git_commit"]  # no git, no error
    assert result["sources"] == [f"models:/portable-base/{result['version']} (@challenger)"]

    # 4. Another process, another directory, a cold cache, the training output and the encoder's source gone:
    #    the registered model loads (mlflow.pyfunc, the stage's own code) and samples.
    shutil.rmtree(out)
    shutil.rmtree(encoder_source)
    shutil.rmtree(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    loaded = _result(_run([str(python), "-I", "-c", LOAD_ELSEWHERE, str(ROOT), uri], elsewhere,
                          {**env, "IMAGEN_CACHE_DIR": str(tmp_path / "cache-elsewhere")}, 300))
    assert loaded == {"size": [16, 16], "seed": 1}
    assert any((tmp_path / "cache-elsewhere" / "text-encoders").iterdir())
