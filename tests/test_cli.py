"""The `imagen` entry point: user errors are reported in seconds, with what to fix, and exit code 2."""
import json
import time

import pytest

from jobs.cli import main


def _run(capsys, argv):
    started = time.monotonic()
    code = main(argv)
    return code, capsys.readouterr().err, time.monotonic() - started


def test_missing_url_list_is_reported_before_any_work(capsys, tmp_path):
    code, err, seconds = _run(capsys, ["data", "ingest", "--urls", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o")])
    assert code == 2 and "nope.parquet: no such file or folder" in err and seconds < 10
    assert not (tmp_path / "o").exists(), "nothing is written for a bad list"


def test_unreachable_tracking_server_is_named_with_what_to_check(capsys):
    code, err, seconds = _run(capsys, ["registry", "list", "--tracking-uri", "http://127.0.0.1:9"])
    assert code == 2 and "http://127.0.0.1:9" in err and "mlflow server" in err and seconds < 10


def test_bad_train_config_names_the_key(capsys, tmp_path):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"stage": {}, "output_dir": str(tmp_path), "run_name": "x", "total_steps": 1,
                                  "data": {"paths": ["a"]}, "learning_rate": 1e-4}))
    code, err, _ = _run(capsys, ["train", "--config", str(config)])
    assert code == 2 and "learning_rate" in err


def test_sample_needs_one_source(capsys):
    code, err, _ = _run(capsys, ["sample", "a red circle"])
    assert code == 2 and "give either model (--model" in err


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_shipped_paper_config_scaled_down_by_set_trains_here(tmp_path):
    """`imagen train` with cluster/train/paper_sr1024_400m.toml, swapped to the tiny SR stage and this machine by
    --set only: the shipped file is what a user runs, every field it sets can be overridden from the command line,
    and the SR stage trains on crops (the paper's 1024 stage recipe) with DeepSpeed on 2 Ray Train workers."""
    import pathlib
    import subprocess
    import sys

    from test_train_data import write_embed_shards

    root = pathlib.Path(__file__).resolve().parents[1]
    write_embed_shards(tmp_path / "embed", 48)
    overrides = {
        "stage": "tiny_sr", "data.train_crop": 16, "output_dir": str(tmp_path / "out"), "total_steps": 4, "run_name": "smoke",
        "data.paths": f"['{tmp_path / 'embed'}']", "data.val_fraction": 0.15, "data.cpus_per_task": 0.25,
        "data.shuffle_buffer_rows": 16, "data.val_max_samples": 8,
        "schedule.warmup_steps": 2, "optim.ema_every": 2, "checkpoint.every_steps": 2,
        "checkpoint.storage_path": str(tmp_path / "ray"), "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.log_every": 2, "tracking.val_every": 4, "tracking.sample_every": 4, "tracking.num_samples": 2,
        "tracking.sample_steps": 3, "scaling.num_workers": 2, "scaling.use_gpu": "false",
        "scaling.cpus_per_worker": 0.5, "scaling.micro_batch_size": 4, "scaling.precision": "auto",
        "scaling.activation_checkpointing": "false",
    }
    argv = [sys.executable, "-m", "jobs.cli", "train", "--config", str(root / "cluster/train/paper_sr1024_400m.toml"),
            "--num-cpus", "2", *(a for k, v in overrides.items() for a in ("--set", f"{k}={v}"))]
    done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    start = done.stdout.find('{\n  "checkpoint_dir"')  # the printed TrainResult; Ray may log around it
    assert start >= 0, done.stdout[-3000:]
    result, _ = json.JSONDecoder().raw_decode(done.stdout, start)
    assert result["metrics"]["step"] == 4
    assert (tmp_path / "out" / "export" / "model.safetensors").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["stage"]["unet"]["text_embed_dim"] == 64 and saved["data"]["train_crop"] == 16
    assert saved["optim"]["lr"] == 1e-4 and saved["data"]["decode_batch_rows"] == 16  # the file's, kept
