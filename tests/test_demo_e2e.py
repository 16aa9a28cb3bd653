"""The main job end to end on this CPU machine: corpus over HTTP -> ingest -> curate -> embed -> train base and SR
with DeepSpeed on Ray Train -> evaluate, register, promote -> sample the champion cascade by alias.

That training learns is shown elsewhere (tests/test_stage.py overfits the tiny stage; tests/test_train_runs.py
checks falling loss under every ZeRO stage); here the steps are few, to keep CI within its budget, and the test
checks that every step runs, accounts for every row, registers and promotes, and resumes without redoing work.
"""
import json

import pytest

from pipelines.demo import DemoConfig, run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_resumes(tmp_path):
    config = DemoConfig(run_dir=str(tmp_path / "demo"), base_steps=20, sr_steps=10)
    summary = run_demo(config)

    funnel = summary["curate_funnel"]
    assert funnel["input"] == config.num_images == summary["ingest"]["input_rows"]
    removed = sum(stage["removed"] for stage in funnel["stages"])
    assert removed + funnel["kept"] == funnel["input"], "every input row is kept or removed with a reason"

    stages = {s["shard_id"]: s for s in summary["registry"]["shards"]}
    base, sr = stages["base"]["metrics"], stages["sr1"]["metrics"]
    print(json.dumps({"base": base, "sr1": sr, "timings_s": summary["timings_s"]}, indent=1))
    assert {"val_loss", "colour_accuracy"} <= set(base) and {"psnr", "psnr_bicubic"} <= set(sr)
    assert "first_champion" in stages["base"]["promotion"]
    assert summary["registry"]["model_uri"] == "models:/imagen-demo@champion"
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0

    # A second run finds every step finished and redoes nothing.
    again = run_demo(config)
    assert again["registry"]["cascade_version"] == summary["registry"]["cascade_version"]
    assert again["ingest"] == summary["ingest"]
    assert again["train"]["base"]["mlflow_run_id"] == summary["train"]["base"]["mlflow_run_id"]
    assert set(again["timings_s"]) == {"ingest", "fit_clip", "curate", "embed", "train_base", "train_sr",
                                       "register", "sample"}  # the report is not rewritten
    assert again["timings_s"]["train_base"] < 5 and again["timings_s"]["register"] < 5
