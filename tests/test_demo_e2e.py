"""The main job end to end on this CPU machine: corpus over HTTP -> ingest -> curate -> embed -> train base and SR
with DeepSpeed on Ray Train -> evaluate, register, promote -> sample the champion cascade by alias.

It must learn: samples for prompts unseen in training are checked for the prompted colours.
"""
import json

import pytest

from pipelines.demo import DemoConfig, run_demo

# Measured on the 2-core CI machine with these settings (see the issue notes); a chance-level model scores ~0.05.
MIN_BASE_COLOUR_ACCURACY = 0.25


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path):
    config = DemoConfig(run_dir=str(tmp_path / "demo"), base_steps=300, sr_steps=100)
    summary = run_demo(config)

    funnel = summary["curate_funnel"]
    assert funnel["input"] == config.num_images == summary["ingest"]["input_rows"]
    removed = sum(stage["removed"] for stage in funnel["stages"])
    assert removed + funnel["kept"] == funnel["input"], "every input row is kept or removed with a reason"

    stages = {s["shard_id"]: s for s in summary["registry"]["shards"]}
    base, sr = stages["base"]["metrics"], stages["sr1"]["metrics"]
    print(json.dumps({"base": base, "sr1": sr, "timings_s": summary["timings_s"]}, indent=1))
    assert base["colour_accuracy"] >= MIN_BASE_COLOUR_ACCURACY
    assert "first_champion" in stages["base"]["promotion"]
    assert summary["registry"]["model_uri"] == "models:/imagen-demo@champion"
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0

    # A second run finds every step finished and redoes nothing.
    again = run_demo(config)
    assert again["registry"]["cascade_version"] == summary["registry"]["cascade_version"]
    assert again["ingest"] == summary["ingest"]
