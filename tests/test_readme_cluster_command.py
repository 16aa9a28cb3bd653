"""The README's cluster command, run as written against a Ray cluster started here with `ray start --head`, a
bucket on a real S3-compatible server on 127.0.0.1 and a real `mlflow server` whose artifacts go to that bucket.

What is swapped, and why:
- the command's placeholders: HEAD:8265 is this cluster's dashboard, my-bucket the test bucket, the MLflow host
  the loopback server. The command line is read from README.md, so the test breaks when the README changes.
- sizes, by `--set` after the README's own: the paper config names T5-XXL, ViT-L/14 and GPUs, none of which
  exist here, so each stage is swapped to a tiny recipe, the data steps to CPU actors with the tiny T5 and a CLIP
  fitted by the tests, and the corpus to the generated one served on 127.0.0.1 (its URL list uploaded to where
  the command points: s3://my-bucket/urls/). Everything else is the file's: bf16, ZeRO-2, activation
  checkpointing, three stages, percentile CLIP selection.

Then the run's outputs are all in the bucket (each step's manifest, Ray Train's checkpoints, the exports,
MLflow's artifacts), `imagen status` (the README's) reads it from there, and resubmitting the same command finds
every step done. The head has room for the three stages at once, so they train concurrently, as on a cluster
big enough for the whole cascade."""
from __future__ import annotations

import json
import pathlib
import re
import shlex
import subprocess

import pytest
from mlflow_server import mlflow_server
from ray_cluster import ray_cluster
from test_curate import clip_cache_root, tiny_clip_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLACEHOLDERS = {"http://HEAD:8265": "dashboard", "my-bucket": "bucket", "http://mlflow.internal:5000": "mlflow"}
STAGES = ("base", "sr1", "sr2")
HEAD_CPUS = 6  # logical: room for the three stages' training at once (1 worker x 0.5 CPU + 1 for Ray Data each)
STEP_DIRS = ("ingest", "scores", "curate", "embed", *(f"train/{s}" for s in STAGES), "heldout",
             "registry/register", "registry/evaluate", "registry/promote")


def readme_command(marker: str) -> list[str]:
    """The README's command that starts with `marker`: a line of a fenced block (`\\` continuations joined) or
    an inline code span."""
    text = (ROOT / "README.md").read_text()
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
             for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    lines += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))]
    for line in lines:
        if line.strip().startswith(marker):
            return shlex.split(line)
    raise AssertionError(f"README.md has no command starting with {marker!r}")


def swapped(argv: list[str], values: dict[str, str], required: tuple[str, ...] = tuple(PLACEHOLDERS)) -> list[str]:
    """`argv` with every placeholder replaced; each of `required` must occur (a README that drops one breaks the
    test)."""
    joined = "\x00".join(argv)
    for placeholder, name in PLACEHOLDERS.items():
        assert placeholder in joined or placeholder not in required, f"the README's command lost {placeholder}: {argv}"
        joined = joined.replace(placeholder, values[name])
    return joined.split("\x00")


def size_overrides(clip: str) -> dict[str, object]:
    """What makes the paper config fit this machine, and nothing else."""
    clip_cpu = f'{{ model_name = "{clip}", device = "cpu", precision = "fp32", batch_size = 64 }}'
    cpu_pool = "{ size = 1, num_cpus = 1, num_gpus = 0 }"
    sets: dict[str, object] = {
        "ingest.rows_per_shard": 40, "ingest.image_size": 64, "ingest.threads_per_shard": 4,
        "ingest.policy.allow_loopback": "true",
        "curate.score.clip": clip_cpu, "curate.pool": cpu_pool,
        # the demo's thresholds for a CLIP fitted on shapes (see pipelines/configs/demo.toml)
        "curate.select.size.min_side": 32, "curate.select.unsafe.enabled": "false",
        "curate.select.near_dup": "{ threshold = 0.85, max_thumbnail_mad = 8.0 }",
        "embed.text_encoder": '{ kind = "t5", name = "imagen-asset:tiny-t5", max_length = 64, batch_size = 64 }',
        "embed.device": "cpu", "embed.pool": cpu_pool,
        "train.base.stage": '{ recipe = "tiny_base", sampler = { steps = 4 } }',
        "train.sr1.stage": '{ recipe = "tiny_sr", sampler = { steps = 4 } }',
        "train.sr2.stage": '{ recipe = "tiny_sr", name = "sr2", lowres_size = 32, unet = { image_size = 64 }, '
                           'sampler = { steps = 4 } }',
        "train.sr2.data.train_crop": 32,
        "evaluate.metrics": '["eval_loss", "clip_score", "psnr"]', "evaluate.num_samples": 4,
        "evaluate.sampler.steps": 4, "evaluate.device": "cpu", "evaluate.clip": clip_cpu, "register.device": "cpu",
    }
    for stage in STAGES:
        sets.update({f"train.{stage}.{k}": v for k, v in {
            "total_steps": 4, "checkpoint.every_steps": 2, "tracking.log_every": 2, "tracking.val_every": 4,
            "tracking.sample_every": 4, "tracking.num_samples": 2, "tracking.sample_steps": 3,
            "schedule.warmup_steps": 2, "optim.ema_every": 2,
            "data.val_fraction": 0.1, "data.val_max_samples": 8, "data.shuffle_buffer_rows": 16,
            "data.cpus_per_task": 0.25, "scaling.num_workers": 1, "scaling.cpus_per_worker": 0.5,
            "scaling.use_gpu": "false", "scaling.micro_batch_size": 4,
        }.items()})
    return sets


def _submit(argv: list[str], sets: dict[str, object], env: dict[str, str], log: pathlib.Path) -> str:
    command = [*argv, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
    text = log.read_text()
    assert done.returncode == 0, text[-5000:]
    return text


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_readme_cluster_command_runs_on_a_ray_cluster_with_s3_and_mlflow(s3, tmp_path, request, tmp_path_factory):
    from mlflow import MlflowClient

    from pipelines.clip_model import ClipConfig
    from pipelines.demo.corpus import DemoCorpusConfig, serve_directory, write_demo_corpus

    server, bucket = s3
    clip = ClipConfig.tiny(tiny_clip_checkpoint(clip_cache_root(request, tmp_path_factory))).model_name
    submit = readme_command("ray job submit")
    status = readme_command("imagen status s3://")
    assert submit[submit.index("--") + 1:][:3] == ["imagen", "run", "cluster/run/paper.toml"], submit

    (tmp_path / "corpus" / "www").mkdir(parents=True)
    with serve_directory(tmp_path / "corpus" / "www") as corpus_server, \
            mlflow_server(tmp_path, f"s3://{bucket}/mlflow", server.env) as mlflow_uri, \
            ray_cluster(HEAD_CPUS, extra_env={**server.env, "IMAGEN_CACHE_DIR": str(tmp_path / "cache")}) as cluster:
        corpus = write_demo_corpus(DemoCorpusConfig(num_images=120, seed=0), tmp_path / "corpus",
                                   corpus_server.base_url)
        server.client().upload_file(str(corpus.url_list), bucket, "urls/urls.parquet")
        values = {"dashboard": cluster.dashboard, "bucket": bucket, "mlflow": mlflow_uri}
        argv, sets = swapped(submit, values), size_overrides(clip)

        log = _submit(argv, sets, cluster.env, tmp_path / "submit.log")
        assert "succeeded" in log and "training 3 stage(s) concurrently" in log, log[-3000:]
        prefix = "imagen/run-1"
        keys = server.keys(bucket)
        for step in STEP_DIRS:
            assert f"{prefix}/{step}/manifest.json" in keys, (step, [k for k in keys if k.startswith(f"{prefix}/{step}")][:20])
        expected = [f"{prefix}/ingest/shards/00000.parquet", f"{prefix}/curate/decisions/00000.parquet",
                    f"{prefix}/embed/shards/00000.parquet", f"{prefix}/pipeline_state.json",
                    f"{prefix}/pipeline_run.json", *(f"{prefix}/train/{s}/export/model.safetensors" for s in STAGES)]
        assert not [k for k in expected if k not in keys], [k for k in expected if k not in keys]
        for stage in STAGES:  # Ray Train's checkpoints and the step ledger
            assert any(k.startswith(f"{prefix}/train/{stage}/ray/") and "checkpoint_" in k for k in keys), stage
            assert any(k.startswith(f"{prefix}/train/{stage}/ledger/") for k in keys), stage
        assert f"{prefix}/run.log" in keys  # the driver's log, copied to the run at the end
        local = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the run's folder on the driver
        assert [p.name for p in local] == ["run.log"], local
        assert any(k.startswith("mlflow/") and k.endswith("model.safetensors") for k in keys)  # MLflow's artifacts
        state = json.loads(server.client().get_object(Bucket=bucket, Key=f"{prefix}/pipeline_state.json")["Body"].read())
        assert state["state"] == "done" and all(s["state"] == "done" for s in state["steps"].values()), state
        config = json.loads(server.client().get_object(Bucket=bucket, Key=f"{prefix}/train/base/train_config.json")["Body"].read())
        assert config["scaling"]["precision"] == "bf16" and config["scaling"]["deepspeed_config"] == "zero2", config["scaling"]

        shown = subprocess.run(swapped(status, values, required=("my-bucket",)), cwd=ROOT, env=cluster.env, capture_output=True,
                               text=True, timeout=120)
        assert shown.returncode == 0 and "run: done" in shown.stdout, shown
        client = MlflowClient(mlflow_uri)
        assert client.get_registered_model("imagen").aliases.get("champion") is not None

        again = _submit(argv, sets, cluster.env, tmp_path / "resubmit.log")
        for step in ("ingest", "curate", "embed", *(f"train_{s}" for s in STAGES), "register", "promote"):
            assert f"{step} already done" in again, (step, again[-3000:])

