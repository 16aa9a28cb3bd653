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
    with pytest.raises(SystemExit, match="either --model"):
        main(["sample", "a red circle"])
