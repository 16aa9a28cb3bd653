"""Register, evaluate, promote, roll back and load by alias against a local sqlite MLflow registry."""
from __future__ import annotations

import hashlib
import pathlib
import shutil
import time
import urllib.parse

import mlflow
import pytest
import torch

from imagen_core.checkpoint import CheckpointError, read_manifest
from pipelines.registry.evaluate import EvalConfig, evaluate_stage
from pipelines.registry.fid import FidConfig
from pipelines.registry.loading import ModelRef, load_cascade, load_registered_stage
from pipelines.registry.promote import list_stages, promote, rollback
from pipelines.registry.register import CascadeSpec, RegisterConfig, config_hash, register_cascade, register_stage

pytest_plugins = ["test_registry_common"]  # its session fixtures (stages, registry) are shared

EXPERIMENT = "registry-tests"


def _register(checkpoint: pathlib.Path, name: str, **kwargs) -> str:
    return register_stage(checkpoint, name, RegisterConfig(experiment=EXPERIMENT, git_commit="test-commit", **kwargs))


def _artifact_dir(model: str, version: str) -> pathlib.Path:
    """Where a version's files lie in the local artifact store (what an attacker with disk access would edit)."""
    uri = mlflow.MlflowClient().get_model_version_download_uri(model, version)
    return pathlib.Path(urllib.parse.urlparse(uri).path)


def test_register_into_a_training_run_of_another_experiment_than_the_active_one(registry, stage_dirs):
    """A process whose active experiment is not the training run's (any earlier set_experiment) still registers
    into the training run: MLflow's start_run(run_id=...) alone refuses that."""
    mlflow.set_experiment("trainings-elsewhere")
    with mlflow.start_run(run_name="train-base") as run:
        pass
    mlflow.set_experiment(EXPERIMENT)
    version = _register(stage_dirs["base"], "other-exp", training_run_id=run.info.run_id)
    assert mlflow.MlflowClient().get_model_version("other-exp-base", version).run_id == run.info.run_id


def test_register_records_provenance_and_sets_challenger(registry, stage_dirs, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"key": "abc"}')
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="train-base") as run:
        mlflow.log_metric("val_loss", 0.75)  # the trainer's own validation loss
    started = time.monotonic()
    version = _register(stage_dirs["base"], "prov", training_run_id=run.info.run_id, dataset_manifest=str(manifest))
    print(f"register_stage took {time.monotonic() - started:.2f} s")
    client = mlflow.MlflowClient()
    mv = client.get_model_version("prov-base", version)
    checkpoint = read_manifest(stage_dirs["base"])
    assert mv.run_id == run.info.run_id  # logged into the training run
    assert mv.tags["training_run_id"] == run.info.run_id
    assert mv.tags["dataset_manifest_hash"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert mv.tags["config_hash"] == config_hash(checkpoint["config"])
    assert mv.tags["weights_sha256"] == checkpoint["files"]["model.safetensors"]["sha256"]
    assert mv.tags["git_commit"] == "test-commit"
    assert float(mv.tags["metric.train_val_loss"]) == 0.75
    assert str(client.get_model_version_by_alias("prov-base", "challenger").version) == version
    assert client.get_registered_model("prov-base").tags["imagen.kind"] == "stage"
    files = _artifact_dir("prov-base", version)
    assert (files / "artifacts" / "checkpoint" / "model.safetensors").is_file()
    assert not list(files.rglob("*.pkl")), "nothing may be pickled into the registry"
    assert "model_code_path" in (files / "MLmodel").read_text()
    requirements = (files / "requirements.txt").read_text()
    assert f"mlflow=={mlflow.__version__}" in requirements and "torch>=" in requirements


def test_promotion_refuses_worse_accepts_better_records_numbers_and_rolls_back(registry, stage_dirs, heldout_dir):
    client = mlflow.MlflowClient()
    config = EvalConfig(heldout_dir=str(heldout_dir), num_samples=4, metrics=("eval_loss",))
    timings = {}

    def register_and_evaluate(checkpoint: str) -> str:
        version = _register(stage_dirs[checkpoint], "promo")
        started = time.monotonic()
        evaluate_stage("promo", "base", version="challenger", config=config)
        timings[checkpoint] = time.monotonic() - started
        return version

    v1 = register_and_evaluate("base")
    first = promote("promo", "base", "eval_loss", min_abs=0.0, min_rel=0.05)
    assert first.outcome == "first_champion" and first.champion_version is None

    v2 = register_and_evaluate("base_trained")
    better = promote("promo", "base", "eval_loss", min_abs=0.0, min_rel=0.05, who="ci")
    print("accepted:", better.summary())
    assert better.outcome == "promoted" and better.challenger_version == v2 and better.champion_version == v1
    assert better.challenger_value < better.champion_value
    gain = better.champion_value - better.challenger_value
    assert better.abs_improvement == pytest.approx(gain)
    assert better.rel_improvement == pytest.approx(gain / better.champion_value)
    assert str(client.get_model_version_by_alias("promo-base", "champion").version) == v2

    v3 = register_and_evaluate("base_other")
    worse = promote("promo", "base", "eval_loss", min_abs=0.0, min_rel=0.05, who="ci")
    print("refused:", worse.summary())
    assert worse.outcome == "refused" and worse.abs_improvement < 0 and worse.champion_version == v2
    assert str(client.get_model_version_by_alias("promo-base", "champion").version) == v2
    tags = client.get_model_version("promo-base", v3).tags
    assert tags["promotion.outcome"] == "refused"
    assert float(tags["promotion.challenger_value"]) == worse.challenger_value
    assert float(tags["promotion.champion_value"]) == worse.champion_value
    assert tags["promotion.champion_version"] == v2 and tags["promotion.by"] == "ci"

    with pytest.raises(ValueError, match="needs a reason"):
        promote("promo", "base", "eval_loss", force=True)
    forced = promote("promo", "base", "eval_loss", force=True, reason="demo of an override", who="alice")
    assert forced.outcome == "forced" and not forced.rule_accepts
    forced_tags = client.get_model_version("promo-base", v3).tags
    assert forced_tags["promotion.by"] == "alice" and forced_tags["promotion.reason"] == "demo of an override"

    back = rollback("promo", "base", reason="forced one was worse", who="bob")
    assert (back.from_version, back.to_version) == (v3, v2)
    assert str(client.get_model_version_by_alias("promo-base", "champion").version) == v2
    assert rollback("promo", "base").to_version == v1
    with pytest.raises(ValueError, match="nothing to roll back"):
        rollback("promo", "base")

    table = list_stages("promo")
    print(table.to_string())
    assert list(table["version"]) == [int(v1), int(v2), int(v3)]
    assert table.set_index("version").loc[int(v1), "aliases"] == "champion"
    assert {"eval_loss", "promotion", "aliases"} <= set(table.columns)
    run_metrics = client.get_run(client.get_model_version("promo-base", v2).run_id).data.metrics
    assert run_metrics["eval/eval_loss"] == pytest.approx(better.challenger_value)
    print("evaluate_stage seconds:", {k: round(v, 2) for k, v in timings.items()})


def test_evaluate_reports_clip_colour_and_says_why_fid_is_skipped(
    registry, stage_dirs, heldout_dir, tiny_clip, tmp_path
):
    clip_config, _, _ = tiny_clip
    _register(stage_dirs["base_trained"], "evalm")
    config = EvalConfig(
        heldout_dir=str(heldout_dir), num_samples=4, clip=clip_config,
        metrics=("eval_loss", "clip_score", "colour_accuracy", "fid", "psnr"),
        fid=FidConfig(inception_weights=str(tmp_path / "none.pth")),
    )
    result = evaluate_stage("evalm", "base", config=config)
    print("metrics:", result.metrics, "notes:", result.notes)
    assert {"eval_loss", "clip_score", "colour_accuracy"} <= set(result.metrics)
    assert 0.0 <= result.metrics["clip_score"] <= 100.0 and 0.0 <= result.metrics["colour_accuracy"] <= 1.0
    assert any(n.startswith("psnr skipped") for n in result.notes)
    assert any(n.startswith(f"FID skipped: no Inception weights at {tmp_path / 'none.pth'}") for n in result.notes)
    tags = mlflow.MlflowClient().get_model_version_by_alias("evalm-base", "challenger").tags
    assert float(tags["metric.clip_score"]) == result.metrics["clip_score"]
    assert "FID skipped" in tags["eval.notes"]


def test_cascade_resolves_stages_by_alias_at_load(registry, stage_dirs):
    _register(stage_dirs["base"], "casc", metrics=(("eval_loss", 1.0),))
    promote("casc", "base", "eval_loss")
    _register(stage_dirs["sr"], "casc", metrics=(("eval_loss", 1.0),))
    promote("casc", "sr1", "eval_loss")
    spec = CascadeSpec(stages=("base", "sr1"), steps=2)
    cascade_v1 = register_cascade("casc", spec, RegisterConfig(experiment=EXPERIMENT))
    before = load_cascade("models:/casc@champion")
    assert before.sources == ["models:/casc-base/1 (@champion)", "models:/casc-sr1/1 (@champion)"]
    assert before.image_size == 16 and before.defaults == {"steps": 2}

    _register(stage_dirs["base_trained"], "casc", metrics=(("eval_loss", 0.5),))
    assert promote("casc", "base", "eval_loss").outcome == "promoted"
    after = load_cascade("models:/casc@champion")  # same cascade version, new base stage
    assert after.sources[0] == "models:/casc-base/2 (@champion)"
    assert str(mlflow.MlflowClient().get_model_version_by_alias("casc", "champion").version) == cascade_v1
    trained = load_registered_stage(ModelRef("casc-base", version="2"))[0]
    loaded = after.cascade.stages[0].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.state_dict().items())

    cascade_v2 = register_cascade("casc", CascadeSpec(stages=("base",)), RegisterConfig(experiment=EXPERIMENT))
    assert load_cascade("models:/casc@champion").image_size == 8
    assert rollback("casc").to_version == cascade_v1 != cascade_v2
    assert load_cascade("models:/casc@champion").image_size == 16


def test_load_by_alias_with_an_explicit_tracking_uri_ignores_the_process_default(registry, stage_dirs, tmp_path):
    """A fresh process (the demo's rerun, `imagen sample --tracking-uri`) has no MLflow URI set: loading with an
    explicit one must resolve the registry there, not in whatever the process default points to."""
    _register(stage_dirs["base"], "elsewhere", metrics=(("eval_loss", 1.0),))
    promote("elsewhere", "base", "eval_loss")
    register_cascade("elsewhere", CascadeSpec(stages=("base",)), RegisterConfig(experiment=EXPERIMENT))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/empty.db")  # the process default is another, empty store
    loaded = load_cascade("models:/elsewhere@champion", tracking_uri=registry)
    assert loaded.sources == ["models:/elsewhere-base/1 (@champion)"]


def test_unknown_alias_and_missing_metric_are_clear(registry, stage_dirs):
    with pytest.raises(LookupError, match=r"models:/nosuch-base@champion does not resolve.*list_stages"):
        load_registered_stage(ModelRef("nosuch-base", alias="champion"))
    _register(stage_dirs["base"], "nometric")
    promote("nometric", "base", "fid")  # first champion needs no comparison
    _register(stage_dirs["base_other"], "nometric")
    with pytest.raises(ValueError, match="no metric.fid tag on v2, v1; run evaluate_stage"):
        promote("nometric", "base", "fid")


@pytest.mark.parametrize("tamper", ["changed_bytes", "missing_weights", "missing_config", "replaced_checkpoint"])
def test_tampered_artifacts_fail_to_load_with_a_clear_error(registry, stage_dirs, tamper):
    name = f"tamper-{tamper.replace('_', '')}"
    version = _register(stage_dirs["base"], name)
    checkpoint = _artifact_dir(f"{name}-base", version) / "artifacts" / "checkpoint"
    if tamper == "changed_bytes":
        data = bytearray((checkpoint / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (checkpoint / "model.safetensors").write_bytes(bytes(data))
        expected = "sha256 mismatch"
    elif tamper == "missing_weights":
        (checkpoint / "model.safetensors").unlink()
        expected = r"model.safetensors is missing"
    elif tamper == "missing_config":
        (checkpoint / "config.json").unlink()
        expected = r"config.json is missing"
    else:  # a different, self-consistent checkpoint swapped in: only the registry's own record can tell
        for file in ("model.safetensors", "config.json"):
            shutil.copy2(stage_dirs["base_other"] / file, checkpoint / file)
        expected = "registry registered"
    with pytest.raises(CheckpointError, match=expected) as error:
        load_registered_stage(ModelRef(f"{name}-base", alias="challenger"))
    assert f"models:/{name}-base@challenger (version {version}) fails verification" in str(error.value)
    with pytest.raises(CheckpointError, match=expected):
        mlflow.pyfunc.load_model(f"models:/{name}-base@challenger")
