"""Training and registering a stage with everything in an object store (a real S3 server, moto, on 127.0.0.1).

Fast: the training data listed from s3:// (a step folder's manifest gives its shards), the ledger's segments,
a checkpoint restored by a rank that downloads only its own files, an export registered and loaded from s3://,
held-out pairs read from s3://. Slow: the tiny stage trained on 2 Ray Train workers with its data, output_dir and
checkpoints on s3://, stopped and resumed from the checkpoints stored there, then registered from its s3 export.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from pipelines import storage
from pipelines.train.checkpointing import MANIFEST_FILE, TrainState, fetch_for_rank, files_for_rank, write_manifest
from pipelines.train.data import parquet_files, text_embed_dim
from pipelines.train.ledger import Ledger, ledger_steps, read_ledger, status_path
from test_registry_common import base_config, make_stage, write_heldout
from test_train_data import tiny_train_config, write_embed_shards

pytest_plugins = ["test_registry_common"]  # the sqlite registry fixture


def _upload_step(local_shards: list[str], target: storage.StoragePath) -> list[str]:
    """An embed step's layout in the store: shards/<id>.parquet, the manifest naming them, and one stray shard
    (a half-written run's) that the manifest does not name."""
    ids = []
    for file in local_shards:
        shard_id = pathlib.Path(file).stem
        ids.append(shard_id)
        storage.copy_tree(storage.path(file), target / "shards" / f"{shard_id}.parquet")
    storage.copy_tree(storage.path(local_shards[0]), target / "shards" / "stray.parquet")
    (target / "manifest.json").write_json({"step": "embed", "key": "k", "shards": [{"shard_id": s} for s in ids]})
    return ids


def test_training_files_are_listed_from_the_store(s3, tmp_path) -> None:
    server, bucket = s3
    shards = write_embed_shards(tmp_path / "embed", 32)
    step = storage.path(f"s3://{bucket}/embed")
    ids = _upload_step(shards, step)
    files = parquet_files((str(step),))
    assert files == [f"s3://{bucket}/embed/shards/{s}.parquet" for s in ids]  # the manifest's, not the stray
    plain = storage.path(f"s3://{bucket}/plain")
    plain.upload_from(tmp_path / "embed")
    (plain / "_tmp.parquet").write_bytes(b"half")
    assert parquet_files((str(plain),)) == [str(plain / pathlib.Path(f).name) for f in sorted(shards)]
    assert parquet_files((files[0],)) == [files[0]]
    assert text_embed_dim(files) == 64
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parquet_files((f"s3://{bucket}/nothing",))


def test_ledger_on_a_store_is_written_as_segments(s3) -> None:
    server, bucket = s3
    out = f"s3://{bucket}/run"
    ledger = Ledger(out, 1)
    for step in (1, 2, 3, 4):
        ledger.append({"rank": 1, "step": step, "keys": [[f"k{step}"]], "loss": [1.0], "time": float(step)})
    assert ledger_steps(out, 1) == 0  # buffered until the checkpoint
    ledger.flush()
    ledger.append({"rank": 1, "step": 5, "keys": [["lost"]], "loss": [1.0], "time": 5.0})
    # A kill here loses step 5; the restart redoes steps 3.. from the checkpoint at 2 (a damaged one at 4).
    again = Ledger(out, 1)
    for step in (3, 4, 5, 6):
        again.append({"rank": 1, "step": step, "keys": [[f"r{step}"]], "loss": [2.0], "time": 10.0 + step})
    again.close()
    assert server.keys(bucket, "run/ledger/") == ["run/ledger/rank1/000000001-000000004.jsonl",
                                                   "run/ledger/rank1/000000003-000000006.jsonl"]
    entries = read_ledger(out)
    assert sorted(entries) == [(1, s) for s in range(1, 7)]
    assert [entries[(1, s)]["keys"] for s in range(1, 7)] == [[["k1"]], [["k2"]], [["r3"]], [["r4"]], [["r5"]],
                                                             [["r6"]]]
    assert ledger_steps(out, 1) == 6 and ledger_steps(out, 0) == 0


def test_worker_status_on_a_store(s3) -> None:
    from pipelines.train.ledger import write_status

    server, bucket = s3
    write_status(f"s3://{bucket}/run", 0, phase="starting")
    write_status(f"s3://{bucket}/run", 0, phase="training", restored_step=4)
    status = status_path(f"s3://{bucket}/run", 0).read_json()
    assert status["phase"] == "training" and status["restored_step"] == 4 and status["attempt"] == 1


def _rank_dir(root: pathlib.Path, rank: int) -> pathlib.Path:
    """What one rank of a ZeRO-2 run writes: its optimiser partition, on rank 0 the model states, DeepSpeed's
    pointer and the EMA; then its trainer state and manifest."""
    d = root / f"local{rank}"
    (d / "ds").mkdir(parents=True)
    (d / "ds" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(bytes(range(256)) * (rank + 3))
    if rank == 0:
        (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 50)
        (d / "latest").write_text("ds")
        (d / "ema").mkdir()
        (d / "ema" / "model.safetensors").write_bytes(b"ema" * 40)
    TrainState(step=4, epoch=0, batches_in_epoch=4, samples_seen=16, world_size=2).write(d, rank)
    write_manifest(d, rank, world_size=2, step=4)
    return d


def test_files_a_rank_needs_under_each_zero_layout() -> None:
    def manifests(names_per_rank):
        return {r: {"files": {n: {} for n in names}} for r, names in enumerate(names_per_rank)}

    own = lambda r: [f"trainer_state.rank{r}.json"]  # noqa: E731
    zero3 = manifests([[f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                        f"ds/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt", *own(r)] + (["latest"] if r == 0 else [])
                       for r in range(2)])
    assert files_for_rank(zero3, 1) == ["ds/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                        "ds/zero_pp_rank_1_mp_rank_00_model_states.pt", "manifest.rank1.json",
                                        "trainer_state.rank1.json"]
    zero0 = manifests([["ds/mp_rank_00_model_states.pt", "zero_to_fp32.py", *own(0)], own(1)])
    assert files_for_rank(zero0, 1) == ["ds/mp_rank_00_model_states.pt", "manifest.rank1.json",
                                        "trainer_state.rank1.json"]


def test_a_rank_restores_only_its_own_files_from_the_store(s3, tmp_path) -> None:
    import pyarrow.fs as pafs

    server, bucket = s3
    checkpoint = storage.path(f"s3://{bucket}/ray/run/checkpoint_00000004")
    for rank in range(2):
        checkpoint.upload_from(_rank_dir(tmp_path, rank))
    fs, root = checkpoint.fs, checkpoint.fs_path
    manifests = {r: json.loads((checkpoint / MANIFEST_FILE.format(rank=r)).read_text()) for r in range(2)}
    assert files_for_rank(manifests, 1) == ["ds/mp_rank_00_model_states.pt",
                                            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                            "manifest.rank1.json", "trainer_state.rank1.json"]
    local = tmp_path / "restore1"
    problems, fetched = fetch_for_rank(fs, root, local, 1, 2)
    assert problems == [] and fetched == files_for_rank(manifests, 1)
    got = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert got == fetched  # nothing of rank 0's own: no optimiser partition, no EMA
    assert TrainState.read(local, 1).samples_seen == 16
    problems, fetched = fetch_for_rank(fs, root, tmp_path / "restore0", 0, 2)
    assert problems == [] and "ema/model.safetensors" in fetched
    assert not any("zero_pp_rank_1" in name for name in fetched)

    # A truncated upload of the other rank's partition: seen from the listing, nothing downloaded.
    victim = checkpoint / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    intact = victim.read_bytes()
    victim.write_bytes(intact[:100])
    problems, fetched = fetch_for_rank(fs, root, tmp_path / "restore1b", 1, 2)
    assert fetched == [] and len(problems) == 1 and "zero_pp_rank_0_mp_rank_00_optim_states.pt has 100 bytes" in problems[0]
    victim.write_bytes(intact)
    # Changed bytes of the rank's own file (same size): its re-hash after the download finds them.
    own = checkpoint / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(own.read_bytes())
    data[3] ^= 0xFF
    own.write_bytes(bytes(data))
    problems, _ = fetch_for_rank(fs, root, tmp_path / "restore1c", 1, 2)
    assert any("sha256" in p for p in problems)
    assert isinstance(fs, pafs.S3FileSystem)


def test_export_on_a_store_registers_loads_and_evaluates(s3, registry, tmp_path) -> None:
    import mlflow
    import torch

    from pipelines.registry.checkpoints import load_stage, read_manifest, save_stage
    from pipelines.registry.evaluate import load_heldout
    from pipelines.registry.loading import ModelRef, load_registered_stage, load_stages
    from pipelines.registry.register import RegisterConfig, register_stage

    server, bucket = s3
    stage = make_stage(base_config(), 0)
    local = save_stage(stage, tmp_path / "export")
    (local / "train.safetensors").write_bytes(b"x" * 10)  # what registration must leave behind
    export = storage.path(f"s3://{bucket}/out/export")
    export.upload_from(local)
    assert read_manifest(str(export))["config"]["name"] == "base"
    manifest = storage.path(f"s3://{bucket}/data/manifest.json")
    manifest.write_json({"key": "abc"})
    version = register_stage(str(export), "s3export", RegisterConfig(
        experiment="registry-tests", git_commit="test", dataset_manifest=str(manifest)))
    assert register_stage(str(export), "s3export", RegisterConfig(experiment="registry-tests",
                                                                   git_commit="test")) == version  # idempotent
    mv = mlflow.MlflowClient().get_model_version("s3export-base", version)
    assert mv.tags["weights_sha256"] == read_manifest(local)["files"]["model.safetensors"]["sha256"]
    loaded, _ = load_registered_stage(ModelRef("s3export-base", alias="challenger"))
    direct = load_stage(str(export))
    (from_list,), sources, _ = load_stages(str(export))
    assert sources == [str(export)]
    for other in (loaded, direct, from_list):
        for key, value in stage.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key

    heldout = storage.path(f"s3://{bucket}/heldout")
    heldout.upload_from(write_heldout(tmp_path / "heldout", n=4))
    from_store = load_heldout(str(heldout), 8, 10)
    on_disk = load_heldout(tmp_path / "heldout", 8, 10)
    assert from_store.captions == on_disk.captions and torch.equal(from_store.images, on_disk.images)


# -- the whole training on s3 ----------------------------------------------------------------------------------

@pytest.fixture
def ray_with_s3(s3):
    """A local 2-CPU Ray started after the s3 fixture set AWS_* (its workers inherit them), shut down after."""
    import ray

    from pipelines.ray_env import RayConfig, init_ray

    if ray.is_initialized():
        ray.shutdown()
    init_ray(RayConfig(num_cpus=2))
    yield s3
    ray.shutdown()


@pytest.mark.slow
def test_stage_trains_resumes_and_registers_all_on_s3(ray_with_s3, registry, tmp_path) -> None:
    from mlflow import MlflowClient

    from pipelines.ray_env import RayConfig
    from pipelines.registry.checkpoints import read_manifest
    from pipelines.registry.loading import ModelRef, load_registered_stage
    from pipelines.registry.register import RegisterConfig, register_stage
    from pipelines.train import train_stage

    server, bucket = ray_with_s3
    data = storage.path(f"s3://{bucket}/embed")
    _upload_step(write_embed_shards(tmp_path / "embed", 64), data)
    out = f"s3://{bucket}/out"
    base = tiny_train_config(str(data), out, total_steps=8)
    config = dataclasses.replace(
        base, stop_at_step=4,
        checkpoint=dataclasses.replace(base.checkpoint, storage_path=f"s3://{bucket}/ray"),
        tracking=dataclasses.replace(base.tracking, tracking_uri=registry, experiment="train-s3"))
    stopped = train_stage(config, RayConfig(num_cpus=2))
    assert stopped.metrics["step"] == 4 and stopped.export_dir == f"{out}/export"
    assert stopped.checkpoint_dir.startswith(f"s3://{bucket}/ray/tiny/checkpoint_00000004")
    assert ledger_steps(out, 0) == 4 and ledger_steps(out, 1) == 4

    resumed = train_stage(dataclasses.replace(config, stop_at_step=None, resume=True), RayConfig(num_cpus=2))
    assert resumed.metrics["step"] == 8 and resumed.mlflow_run_id == stopped.mlflow_run_id
    keys = server.keys(bucket)
    ray_keys = [k for k in keys if k.startswith("ray/tiny/checkpoint_00000008")]
    for name in ("ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "manifest.rank0.json", "manifest.rank1.json",
                 "trainer_state.rank1.json", "ema/model.safetensors"):
        assert any(k.endswith("/" + name) for k in ray_keys), (name, ray_keys)
    assert {"out/export/model.safetensors", "out/export/train.safetensors", "out/export/config.json",
            "out/train_config.json", "out/deepspeed.json", "out/mlflow_run.json", "out/memory.json",
            "out/workers/rank0.json", "out/workers/rank1.json"} <= set(keys)
    for rank in range(2):
        assert [k for k in keys if k.startswith(f"out/ledger/rank{rank}/")] == [
            f"out/ledger/rank{rank}/000000001-000000004.jsonl", f"out/ledger/rank{rank}/000000005-000000008.jsonl"]
    assert not any(k.startswith("out/ledger/rank0.jsonl") for k in keys)

    # Each rank restored step 4 from s3 with only its own files (and the model states every rank loads).
    for rank in range(2):
        status = status_path(out, rank).read_json()
        assert status["restored_step"] == 4 and "/checkpoint_00000004_" in status["restored_from"]
        fetched = status["restored_files"]
        assert f"ds/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in fetched
        assert f"trainer_state.rank{rank}.json" in fetched and "ds/mp_rank_00_model_states.pt" in fetched
        assert not any(f"rank{1 - rank}" in name for name in fetched), fetched
        assert any(name.startswith("ema/") for name in fetched) == (rank == 0)

    # The trajectory: every (rank, step) once, epoch 0 without a repeated sample, the data position continued.
    ledger = read_ledger(out)
    assert sorted(ledger) == [(r, s) for r in range(2) for s in range(1, 9)]
    seen = [k for (_, _), e in sorted(ledger.items()) if e["epoch"] == 0 for keys_ in e["keys"] for k in keys_]
    assert len(seen) == len(set(seen))
    micro = config.scaling.micro_batch_size
    final = storage.path(resumed.checkpoint_dir)
    assert final.name.startswith("checkpoint_00000008")
    assert [(final / f"trainer_state.rank{r}.json").read_json()["samples_seen"] for r in range(2)] == [8 * micro] * 2

    # MLflow logged the export from s3; the export registers from s3 and loads back.
    client = MlflowClient(tracking_uri=registry)
    artifacts = {f.path for f in client.list_artifacts(resumed.mlflow_run_id, "export")}
    assert {"export/model.safetensors", "export/config.json"} <= artifacts
    assert read_manifest(resumed.export_dir)["extra"]["step"] == 8
    version = register_stage(resumed.export_dir, "s3train", RegisterConfig(
        experiment="registry-tests", git_commit="test", training_run_id=resumed.mlflow_run_id))
    stage, mv = load_registered_stage(ModelRef("s3train-base", version=version))
    assert stage.config == config.stage and mv.run_id == resumed.mlflow_run_id
