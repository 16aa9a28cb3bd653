"""The pipeline config behind `imagen run`: built from the shipped demo file, paths filled from run_dir, and every
kind of bad config (unknown key, wrong type, missing URL list, unreachable MLflow, a DeepSpeed setting the stage
contradicts, a text width that differs from the embeddings') refused in seconds, before any step, naming the field."""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagen_core.config_io import ConfigError
from imagen_core.recipes import tiny_text_encoder
from jobs.cli import main

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
from pipelines.demo.run import demo_table
from pipelines.pipeline_config import pipeline_config_from_dict
from pipelines.preflight import preflight, text_encoder_width


@pytest.fixture
def url_list(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.png"], "caption": ["a red circle"]}), path)
    return path


def tiny_table(tmp_path, url_list) -> dict:
    """The shipped demo config with its demo-made inputs swapped for the tiny T5 and a one-row URL list."""
    data = demo_table()
    data.pop("demo", None)
    data["run_dir"] = str(tmp_path / "run")
    data["ingest"]["url_list"] = {"paths": [str(url_list)]}
    data["curate"]["score"] = {"clip": {"model_name": "local-dir:/nowhere"}}
    encoder = tiny_text_encoder()
    data["embed"] = {"text_encoder": {"kind": encoder.kind, "name": encoder.name}}
    for stage, recipe in (("base", "tiny_base"), ("sr1", "tiny_sr")):
        data["train"][stage]["stage"] = recipe
    return data


def test_demo_config_fills_paths_and_links_steps(tmp_path, url_list):
    config = pipeline_config_from_dict(tiny_table(tmp_path, url_list))
    root = tmp_path / "run"
    assert config.ingest.output_dir == str(root / "ingest")
    assert list(config.train) == ["base", "sr1"]
    for name, train in config.train.items():
        assert train.stage.name == name and train.run_name == name and train.resume
        assert train.output_dir == str(root / "train" / name)
        assert train.data.paths == (str(root / "embed" / "shards"),)
        assert train.stage.text_encoder == config.embed.text_encoder  # conditioned on what embed stores
        assert train.tracking.tracking_uri == config.mlflow_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert config.train["base"].total_steps == 600 and config.train["sr1"].stage.is_super_resolution
    assert config.evaluate.heldout_dir == str(root / "heldout")
    assert config.promote.metric == "eval_loss" in config.evaluate.metrics


@pytest.mark.parametrize("assignment, named", [
    ("curate.select.near_dup.treshold=0.5", "curate.select.near_dup: unknown key(s) ['treshold']"),
    ("train.base.total_steps='many'", "train.base.total_steps: expected int"),
    ("evaluate.metrics=['eval_loss', 'beauty']", "evaluate.metrics[1]: 'beauty' is not one of"),
    ("promote.metric='fid'", "promote.metric 'fid' is not computed"),
    ("train.base.optim.kind='adafactor'", "train.base: optim.kind='adafactor' needs ZeRO stage 0"),
    ("bogus=1", "unknown key(s) ['bogus']"),
])
def test_bad_fields_are_named(tmp_path, url_list, assignment, named):
    from imagen_core.config_io import apply_override

    with pytest.raises(ConfigError) as error:
        pipeline_config_from_dict(apply_override(tiny_table(tmp_path, url_list), assignment))
    assert named in str(error.value)


def test_text_width_that_differs_from_the_embeddings_is_refused(tmp_path, url_list):
    data = tiny_table(tmp_path, url_list)
    width = text_encoder_width(tiny_text_encoder())
    assert width == 64
    data["train"]["sr1"]["stage"] = {"recipe": "tiny_sr", "unet": {"text_embed_dim": 32}}
    with pytest.raises(ConfigError, match=r"train.sr1.stage.unet.text_embed_dim is 32 .* gives 64-wide"):
        preflight(pipeline_config_from_dict(data))


def test_a_stage_text_encoder_is_refused_the_embed_steps_is_the_one(tmp_path, url_list):
    data = tiny_table(tmp_path, url_list)
    data["train"]["base"]["stage"] = {"recipe": "tiny_base", "text_encoder": {"kind": "t5", "name": "google/t5-v1_1-xxl"}}
    with pytest.raises(ConfigError, match="train.base.stage.text_encoder: a stage takes the embed step's"):
        pipeline_config_from_dict(data)
    with pytest.raises(ConfigError, match="train.sr1.stage.text_encoder.max_length: a stage takes"):
        pipeline_config_from_dict(tiny_table(tmp_path, url_list), ["train.sr1.stage.text_encoder.max_length=8"])


def test_an_override_changes_one_field_of_a_stage_recipe(tmp_path, url_list):
    config = pipeline_config_from_dict(tiny_table(tmp_path, url_list), ["train.base.stage.sampler.steps=7"])
    assert config.train["base"].stage.sampler.steps == 7 and config.train["base"].stage.name == "base"


def test_deepspeed_setting_the_trainer_contradicts_is_named(tmp_path, url_list):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    data = tiny_table(tmp_path, url_list)
    data["train"]["base"]["scaling"]["deepspeed_config"] = str(ds)
    with pytest.raises(ConfigError, match=r"train.base.scaling: DeepSpeed config .* has an 'optimizer' section"):
        preflight(pipeline_config_from_dict(data))


def _run_cli(capsys, argv):
    started = time.monotonic()
    code = main(argv)
    return code, capsys.readouterr().err, time.monotonic() - started


def _write_toml(path, data) -> str:
    """A small TOML writer for the nested tables of a config (strings, numbers, booleans, lists)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    def table(prefix, d, out):
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix and scalars:
            out.append(f"[{prefix}]")
        out.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v, out)
        return out

    path.write_text("\n".join(table("", data, [])) + "\n")
    return str(path)


def test_run_with_a_missing_url_list_fails_in_seconds_before_any_step(capsys, tmp_path, url_list):
    data = tiny_table(tmp_path, url_list)
    data["ingest"]["url_list"]["paths"] = [str(tmp_path / "nope.parquet")]
    code, err, seconds = _run_cli(capsys, ["run", _write_toml(tmp_path / "p.toml", data)])
    assert code == 2 and "nope.parquet" in err and seconds < 30
    assert not (tmp_path / "run").exists(), "nothing is written before the checks pass"


def test_run_with_an_unreachable_tracking_server_fails_in_seconds(capsys, tmp_path, url_list):
    data = tiny_table(tmp_path, url_list)
    data["tracking_uri"] = "http://127.0.0.1:9"
    code, err, seconds = _run_cli(capsys, ["run", _write_toml(tmp_path / "p.toml", data)])
    assert code == 2 and "http://127.0.0.1:9" in err and seconds < 30
    assert not (tmp_path / "run").exists()


def test_run_with_missing_clip_weights_fails_in_seconds_before_any_step(capsys, tmp_path, url_list):
    # Its CLIP is local-dir:/nowhere; on the way the default sqlite store in a run_dir not yet made passes.
    data = tiny_table(tmp_path, url_list)
    code, err, seconds = _run_cli(capsys, ["run", _write_toml(tmp_path / "p.toml", data)])
    assert code == 2 and "CLIP folder /nowhere lacks open_clip_config.json" in err and seconds < 30, err
    assert not (tmp_path / "run" / "ingest").exists(), "no step ran"


def test_run_names_a_bad_override(capsys, tmp_path, url_list):
    path = _write_toml(tmp_path / "p.toml", tiny_table(tmp_path, url_list))
    code, err, _ = _run_cli(capsys, ["run", path, "--set", "train.sr1.scaling.zero_stage=5"])
    assert code == 2 and "train.sr1.scaling.zero_stage: 5 fits none of" in err


def test_every_data_command_takes_config_and_set_with_named_errors(capsys, tmp_path):
    cases = [
        (["data", "curate", "--ingest", "i", "--out", "o", "--clip-model", "local-dir:x",
          "--set", "curate.select.near_dup.treshold=1"], "curate.select.near_dup: unknown key(s) ['treshold']"),
        (["data", "embed", "--curate", "c", "--out", "o", "--set", "embed.pool.size=0"], "embed.pool"),
        (["data", "ingest", "--urls", "u.parquet", "--out", "o", "--set", "ingest.rows_per_shard=-1"],
         "ingest: rows_per_shard must be >= 1"),
        (["data", "search", "q", "--data", "d", "--set", "k='ten'"], "k: expected int"),
        (["registry", "evaluate", "--stage", "base", "--metrics", "eval_loss", "beauty"], "'beauty' is not one of"),
        (["sample", "a red circle"], "give either model"),
    ]
    for argv, named in cases:
        code, err, seconds = _run_cli(capsys, argv)
        assert code == 2 and seconds < 30, (argv, err)
        if named:
            assert named in err, (argv, err)


def test_shipped_paper_pipeline_config_builds_to_the_paper_cascade():
    from pipelines.pipeline_config import load_pipeline_config
    from pipelines.preflight import check_stages

    config = load_pipeline_config(str(ROOT / "cluster" / "run" / "paper.toml"))
    assert list(config.train) == ["base", "sr1", "sr2"]
    sizes = [(t.stage.lowres_size, t.stage.image_size) for t in config.train.values()]
    assert sizes == [(None, 64), (64, 256), (256, 1024)] and config.train["sr2"].data.train_crop == 256
    for train in config.train.values():
        assert train.stage.text_encoder.name == "google/t5-v1_1-xxl" and train.stage.unet.text_embed_dim == 4096
        assert train.scaling.precision == "bf16" and train.scaling.use_gpu
    check_stages(config)  # DeepSpeed settings resolve for every stage


def test_a_super_resolution_stage_must_take_the_previous_stages_size(tmp_path, url_list):
    data = tiny_table(tmp_path, url_list)
    data["train"]["sr1"]["stage"] = {"recipe": "tiny_sr", "lowres_size": 8}
    with pytest.raises(ConfigError, match="train.sr1.stage.lowres_size is 8 but the stage before it, train.base, makes 16"):
        pipeline_config_from_dict(data)


def test_stage_trainings_run_together_only_when_the_cluster_holds_all_of_them(tmp_path, url_list):
    from pipelines.pipeline import fits_together, stage_demand

    config = pipeline_config_from_dict(tiny_table(tmp_path, url_list))
    demands = [stage_demand(t) for t in config.train.values()]
    assert demands == [{"CPU": 2.0}, {"CPU": 2.0}]  # 2 workers x 0.5 CPU + 1 CPU for each input pipeline
    assert not fits_together(demands, {"CPU": 2.0})  # this 2-core machine: one after another
    assert fits_together(demands, {"CPU": 4.0})
    gpu = pipeline_config_from_dict(load_paper_table(), [])
    gpu_demands = [stage_demand(t) for t in gpu.train.values()]
    assert gpu_demands[0] == {"CPU": 64 * 8 + 1.0, "GPU": 64.0}
    assert not fits_together(gpu_demands, {"CPU": 4000.0, "GPU": 256.0})
    assert fits_together(gpu_demands, {"CPU": 4000.0, "GPU": 320.0})


def load_paper_table() -> dict:
    from imagen_core.config_io import load_file

    return load_file(str(ROOT / "cluster" / "run" / "paper.toml"))


def test_tracking_uri_falls_back_to_the_environment_then_the_run_directory(tmp_path, url_list, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert pipeline_config_from_dict(tiny_table(tmp_path, url_list)).mlflow_uri.startswith("sqlite:///")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # a cluster's Secret sets it
    config = pipeline_config_from_dict(tiny_table(tmp_path, url_list))
    assert config.mlflow_uri == "http://127.0.0.1:5999"
    assert all(t.tracking.tracking_uri == "http://127.0.0.1:5999" for t in config.train.values())


def test_an_object_store_run_dir_needs_a_tracking_server(tmp_path, url_list, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = {**tiny_table(tmp_path, url_list), "run_dir": "s3://my-bucket/runs/r1"}
    with pytest.raises(ConfigError, match=r"tracking_uri: run_dir s3://my-bucket/runs/r1 is in an object store"):
        pipeline_config_from_dict(data)


def test_run_into_a_bucket_that_does_not_exist_fails_before_any_step(capsys, tmp_path, url_list, s3):
    data = {**tiny_table(tmp_path, url_list), "run_dir": "s3://no-such-bucket-for-imagen/runs/r1",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    code, err, seconds = _run_cli(capsys, ["run", _write_toml(tmp_path / "p.toml", data)])
    assert code == 2 and "run_dir s3://no-such-bucket-for-imagen/runs/r1 cannot be written" in err, err
    assert seconds < 30 and not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched
