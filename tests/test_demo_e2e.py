"""The main job end to end on this CPU machine, at its default size: corpus over HTTP -> ingest -> curate -> embed
-> train base and SR with DeepSpeed on Ray Train -> evaluate, register, promote -> sample the champion cascade
by alias. It checks that every step runs and accounts for every row, that the trained cascade learned (colours
of prompts unseen in training; SR output against the ground truth), that a rerun redoes nothing, and that MLflow
holds the run as a parent with a nested run per step.
"""
import json

import pytest

from pipelines.demo import DemoConfig, run_demo
from pipelines.demo_corpus import COLOURS

CHANCE_BACKGROUND = 1 / len(COLOURS)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_learns_end_to_end_and_resumes(tmp_path):
    config = DemoConfig(run_dir=str(tmp_path / "demo"))
    summary = run_demo(config)

    funnel = summary["curate_funnel"]
    assert funnel["input"] == config.num_images == summary["ingest"]["input_rows"]
    removed = sum(stage["removed"] for stage in funnel["stages"])
    assert removed + funnel["kept"] == funnel["input"], "every input row is kept or removed with a reason"

    stages = {s["shard_id"]: s for s in summary["registry"]["shards"]}
    base, sr = stages["base"]["metrics"], stages["sr1"]["metrics"]
    samples = summary["samples"]
    print(json.dumps({"base": base, "sr1": sr, "samples": samples, "timings_s": summary["timings_s"]}, indent=1))
    assert {"val_loss", "colour_accuracy"} <= set(base) and {"psnr", "psnr_bicubic"} <= set(sr)
    assert "first_champion" in stages["base"]["promotion"]
    assert summary["registry"]["model_uri"] == "models:/imagen-demo@champion"
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0

    # Learning: the champion cascade's samples for 16 prompts unseen in training show the prompted background
    # far above chance, and the SR stage's output of held-out images is nearer the ground truth than bicubic
    # upsampling of the same low-resolution input.
    assert samples["prompts"] == 16
    assert samples["cascade_background_accuracy"] >= 5 * CHANCE_BACKGROUND
    assert samples["cascade_colour_accuracy"] >= 0.1
    assert sr["psnr"] > sr["psnr_bicubic"]

    # A second run finds every step finished and redoes nothing.
    again = run_demo(config)
    assert again["registry"]["cascade_version"] == summary["registry"]["cascade_version"]
    assert again["ingest"] == summary["ingest"]
    assert again["train"]["base"]["mlflow_run_id"] == summary["train"]["base"]["mlflow_run_id"]
    assert set(again["timings_s"]) == {"ingest", "fit_clip", "curate", "report", "embed", "train_base", "train_sr1",
                                       "register", "sample"}
    assert again["timings_s"]["train_base"] < 5 and again["timings_s"]["register"] < 5

    # MLflow: one parent run for the run directory, a nested run per step (the stage trainings' own runs are
    # their steps' records); the rerun continued the same parent and recorded no step twice.
    from mlflow import MlflowClient

    from pipelines.workflow import PARENT_TAG, STEP_TAG

    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert all(step["recorded_now"] for step in summary["steps"].values())
    assert not any(step["recorded_now"] for step in again["steps"].values())
    client = MlflowClient(config.mlflow_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    nested = client.search_runs([parent.info.experiment_id], filter_string=f"tags.{PARENT_TAG} = '{parent.info.run_id}'")
    assert sorted(r.data.tags[STEP_TAG] for r in nested) == sorted(summary["steps"])
    assert all(r.info.status == "FINISHED" for r in nested)
    assert summary["steps"]["train_base"]["mlflow_run_id"] == summary["train"]["base"]["mlflow_run_id"]
