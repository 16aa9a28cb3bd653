"""End-to-end training runs of the tiny stage on 2 CPU workers (gloo), sharing one Ray session.

- ZeRO 1, 2 and 3 train (falling loss), hold about half the per-rank state of a one-rank engine (measured from
  the engines), and end with the weights and EMA that a plain one-process torch loop computes when it replays
  the same samples and noise (the reference for DeepSpeed and for the EMA gathered under ZeRO);
- stop at step 8 and resume to 16 gives the uninterrupted run's samples and losses, each sample once per epoch,
  also when the resumed fit reads its input materialized (decoded once) instead of streamed;
- kill -9 of a worker with the latest checkpoint truncated: Ray Train restarts, the damaged checkpoint is
  skipped for the one before it, and the run ends where the uninterrupted run ended;
- MLflow holds the run: params, metrics, sample grids, the export.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from imagen_core.recipes import stage_tiny_base, stage_tiny_sr
from pipelines.train.checkpointing import TrainState
from pipelines.train.data import Collate, DecodeImages, build_dataset, held_out, parquet_files, read_val_rows
from pipelines.train.dsconfig import load_deepspeed_json
from pipelines.train.engine import build_optimizer, lr_factor, noise_seed
from pipelines.train.ledger import read_ledger, status_path
from test_train_data import tiny_train_config, write_embed_shards

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 16
STAGES = {1: stage_tiny_sr, 2: stage_tiny_base, 3: stage_tiny_base}
WEIGHT_TOLERANCE = 1e-4
"""Max |difference| between DeepSpeed's weights/EMA and the plain-torch replay after 16 steps. Seen: 1e-5 to
2.2e-5 (fp32 reduction order, amplified by Adam where gradients are tiny). A real error (averaging, clipping,
lr schedule, a skipped EMA update) moves weights by about one lr step, 2e-3."""
RESUME_TOLERANCE = 1e-6
"""Max |difference| of a step's loss between a resumed (or recovered) run and the uninterrupted one."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("embed")
    write_embed_shards(directory, 96)
    return directory


def deepspeed_json(stage: int, directory: pathlib.Path) -> str:
    """The shipped zeroN.json; for ZeRO-3 with every parameter partitioned (the tiny net's parameters are all
    below the shipped persistence threshold, which would keep them whole on every rank)."""
    if stage != 3:
        return f"zero{stage}"
    config = load_deepspeed_json("zero3")
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = directory / "zero3_partition_all.json"
    path.write_text(json.dumps(config))
    return str(path)


def train(config):
    from pipelines.ray_env import RayConfig
    from pipelines.train import train_stage

    return train_stage(config, RayConfig(num_cpus=2))


def shared_tracking(config, uri: str):
    """`config` logging to the MLflow store at `uri`: the module's fits share one sqlite database (a new one is
    created and migrated in 1.2-3 s, paid by every fit with its own) and keep their own runs in it."""
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, tracking_uri=uri))


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def fitted(ray_session, data_dir, tracking_uri, tmp_path_factory):
    """stage -> (config, TrainResult), each ZeRO stage trained once per module. ZeRO-1 trains the tiny SR stage
    (same trainer, another StageConfig); ZeRO-2 is the reference run of the resume and recovery tests."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"zero{stage}")
            config = tiny_train_config(data_dir, out, deepspeed_config=deepspeed_json(stage, out), total_steps=STEPS,
                                       run_name=f"zero{stage}", stage=STAGES[stage]())
            config = shared_tracking(config, tracking_uri)
            if stage == 3:  # the activation-checkpointing switch, under the stage that re-gathers for recompute
                config = dataclasses.replace(config, scaling=dataclasses.replace(config.scaling,
                                                                                 activation_checkpointing=True))
            runs[stage] = (config, train(config))
        return runs[stage]

    return run


# -- ZeRO stages ---------------------------------------------------------------------------------------------

ONE_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from pipelines.train.config import TrainConfig
from pipelines.train.dsconfig import resolve_deepspeed_config
from pipelines.train.engine import build_engine, memory_stats
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=0, world_size=1)
config = TrainConfig.from_dict(json.loads(open(sys.argv[1]).read()))
engine = build_engine(config, resolve_deepspeed_config(config))
size, low = config.stage.image_size, config.stage.lowres_size  # one step: every optimiser has made its state
lowres = torch.zeros(4, 3, low, low) if low else None
loss = engine(torch.zeros(4, 3, size, size), torch.zeros(4, 5, 64), torch.ones(4, 5, dtype=torch.bool), lowres).mean()
engine.backward(loss)
engine.step()
print("STATS" + json.dumps(memory_stats(engine)))
"""


def one_rank_memory(config, directory: pathlib.Path) -> dict[str, float]:
    """The same engine as a one-rank run, in a fresh process (the baseline the 2-rank numbers halve)."""
    one = dataclasses.replace(config, scaling=dataclasses.replace(config.scaling, num_workers=1))
    path = directory / "one_rank_config.json"
    path.write_text(json.dumps(one.to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-c", ONE_RANK_SCRIPT, str(path), str(port)], cwd=ROOT,
                          env={**os.environ, "LOCAL_RANK": "0"}, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("STATS")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1][len("STATS"):])


def replay(config, ds_config, ledger) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain torch, one process: each step sums the gradients of every (micro-batch, rank) the ledger records,
    with the noise seeds the workers used, averages, clips, steps the optimiser and the LambdaLR, and updates
    the EMA every ema_every steps."""
    import pyarrow.parquet as pq

    from imagen_core.ema import EMA
    from imagen_core.stage import DiffusionStage

    table = pq.read_table(parquet_files(config.data.paths))
    index = {k: i for i, k in enumerate(table["key"].to_pylist())}
    decode = DecodeImages(config.stage.image_size, config.stage.lowres_size)
    collate = Collate(64, config.stage.text_encoder.max_length)

    def batch(keys):
        rows = table.take([index[k] for k in keys])
        return collate(decode({name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}))

    torch.manual_seed(config.seed)
    model = DiffusionStage(config.stage_config)
    optimizer = build_optimizer(model.parameters(), config.optim)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.schedule, config.total_steps))
    ema = EMA(model)
    world, gas = config.scaling.num_workers, ds_config["gradient_accumulation_steps"]
    for step in range(1, config.last_step + 1):
        optimizer.zero_grad()
        for micro in range(gas):
            for rank in range(world):
                b = batch(ledger[(rank, step)]["keys"][micro])
                generator = torch.Generator().manual_seed(noise_seed(config.seed, step - 1, micro, rank))
                loss = model(b.images, b.text_embeds, b.text_mask, b.lowres, generator=generator).mean()
                (loss / (gas * world)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ds_config["gradient_clipping"])
        optimizer.step()
        schedule.step()
        if step % config.optim.ema_every == 0:
            ema.update(model, config.optim.ema_decay)
    return model.state_dict(), ema.weights()


def mean_step_losses(ledger, steps: int, world: int) -> list[float]:
    return [float(np.mean([np.mean(ledger[(r, s)]["loss"]) for r in range(world)])) for s in range(1, steps + 1)]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_halves_state_and_matches_reference(stage: int, fitted) -> None:
    from imagen_core.checkpoint import MODEL_FILE, TRAIN_FILE, load_checkpoint
    from imagen_core.stage import DiffusionStage, StageConfig

    config, result = fitted(stage)
    out = pathlib.Path(config.output_dir)
    ledger = read_ledger(out)
    losses = mean_step_losses(ledger, STEPS, 2)
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.03, losses
    assert result.metrics["step"] == STEPS and np.isfinite(result.metrics["val_loss"])

    per_rank = json.loads((out / "memory.json").read_text())["per_rank"]
    single = one_rank_memory(config, out)
    names = ["optimizer_state_numel"] + (["param_numel"] if stage == 3 else [])
    measured = {name: [r[name] / single[name] for r in per_rank] for name in names}
    print(f"ZeRO-{stage}: per-rank / one-rank = {measured}; one rank {single}; 2 ranks {per_rank}")
    for ratios in measured.values():
        assert all(0.45 < r < 0.55 for r in ratios), measured

    ds_config = json.loads((out / "deepspeed.json").read_text())
    weights, ema = replay(config, ds_config, ledger)
    trained, _ = load_checkpoint(out / "export", filename=TRAIN_FILE)
    averaged, stage_config = load_checkpoint(out / "export", filename=MODEL_FILE)
    weight_diff = max((trained[k] - v).abs().max().item() for k, v in weights.items())
    ema_diff = max((averaged[k] - v).abs().max().item() for k, v in ema.items())
    moved = max((averaged[k] - trained[k]).abs().max().item() for k in ema)
    print(f"ZeRO-{stage}: max |weights - replay| {weight_diff:.2e}, max |EMA - replay| {ema_diff:.2e}, "
          f"max |EMA - weights| {moved:.2e}; losses {[round(x, 3) for x in losses]}")
    assert weight_diff < WEIGHT_TOLERANCE and ema_diff < WEIGHT_TOLERANCE
    # The EMA is not the training weights (decay 0.9 every 2 steps): the check above can tell them apart.
    assert moved > 10 * max(weight_diff, ema_diff)
    # The export rebuilds with nothing else: its config.json holds the StageConfig.
    assert StageConfig.from_dict(stage_config) == config.stage
    DiffusionStage(StageConfig.from_dict(stage_config)).load_state_dict(averaged, strict=True)

    final = pathlib.Path(result.checkpoint_dir)
    for rank in range(2):
        state = TrainState.read(final, rank)
        assert state.step == STEPS and state.samples_seen == STEPS * config.scaling.micro_batch_size


def test_mlflow_holds_run_metrics_grids_and_export(fitted) -> None:
    from mlflow import MlflowClient

    config, result = fitted(3)
    client = MlflowClient(tracking_uri=config.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == config.run_name
    assert run.data.params["deepspeed.zero_optimization.stage"] == "3"
    assert run.data.params["optim.kind"] == "adamw"
    for metric in ("loss", "lr", "grad_norm", "images_per_s", "samples_seen", "data_wait_fraction",
                   "memory/rank1/rss_bytes", "memory/rank1/param_numel", "val_loss", "val_loss_train_weights"):
        assert metric in run.data.metrics, metric
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4, 8, 12, 16]
    assert run.data.metrics["samples_seen"] == STEPS * 2 * config.scaling.micro_batch_size
    artifacts = {f.path for d in ("samples", "export", "config") for f in client.list_artifacts(run.info.run_id, d)}
    assert {"samples/step_00000008.png", "samples/step_00000016.png", "samples/step_00000016.json",
            "export/model.safetensors", "export/train.safetensors", "export/config.json",
            "config/train_config.json", "config/deepspeed.json"} <= artifacts
    png = pathlib.Path(client.download_artifacts(run.info.run_id, "samples/step_00000016.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- data, resume, recovery ----------------------------------------------------------------------------------

def test_ray_data_pipeline_splits_and_repeats_exactly(ray_session, data_dir) -> None:
    """Decoding runs in Ray Data; the splits partition the keys; two executions give the same order."""
    import ray

    from pipelines.train.config import DataConfig

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # what the trainer's DataConfig sets; datasets copy it
    try:
        data = DataConfig(paths=(str(data_dir),), val_fraction=0.25)
        files = parquet_files(data.paths)
        train_ds = build_dataset(files, "train", data, 16, 8, seed=3)
        val_ds = build_dataset(files, "val", data, 16, 8, seed=3)
        collate = Collate(64, 16)

        def keys(ds):
            out = []
            for batch in ds.iterator().iter_torch_batches(batch_size=5, collate_fn=collate):
                assert batch.images.shape[1:] == (3, 16, 16) and batch.lowres.shape[1:] == (3, 8, 8)
                assert batch.images.min() >= -1 and batch.images.max() <= 1
                assert batch.text_mask[:, 0].all() and batch.text_embeds.shape[2] == 64
                out += batch.keys
            return out

        train_keys, val_keys = keys(train_ds), keys(val_ds)
        assert sorted(train_keys + val_keys) == [f"{i:06d}" for i in range(96)]
        # The trainer reads validation rows in process (read_val_rows): the Ray Data val split's rows, in order.
        direct = read_val_rows(files, data, 16, 8)
        assert list(direct["key"]) == val_keys
        streamed = next(iter(val_ds.iter_batches(batch_size=len(val_keys), batch_format="numpy")))
        assert np.array_equal(direct["image"], streamed["image"]) and np.array_equal(direct["lowres"], streamed["lowres"])
        assert all(np.array_equal(a, b) for a, b in zip(direct["text_embedding"], streamed["text_embedding"]))
        capped = read_val_rows(files, dataclasses.replace(data, val_max_samples=3), 16, 8)
        assert list(capped["key"]) == val_keys[:3]
        assert val_keys and all(held_out(k, 0.25) for k in val_keys)
        assert not any(held_out(k, 0.25) for k in train_keys)
        assert keys(train_ds) == train_keys
    finally:
        context.execution_options.preserve_order = False


def test_cpu_layout_that_would_starve_ray_data_is_refused(ray_session, data_dir, tmp_path) -> None:
    """2 workers x 1 CPU on this 2-CPU Ray leaves Ray Data nothing (it waits for ever); 2 x 0.5 fits."""
    from pipelines.train.config import ScalingConfig
    from pipelines.train.trainer import check_cpu_budget

    greedy = tiny_train_config(data_dir, tmp_path, scaling=ScalingConfig(num_workers=2, cpus_per_worker=1.0))
    with pytest.raises(ValueError, match="Ray Data needs at least 1 CPU"):
        check_cpu_budget(greedy)
    check_cpu_budget(tiny_train_config(data_dir, tmp_path))


def assert_same_trajectory(ledger, reference, steps: int) -> float:
    """Same keys per (rank, step) and the same losses; returns the largest loss difference."""
    worst = 0.0
    for rank in range(2):
        for step in range(1, steps + 1):
            got, want = ledger[(rank, step)], reference[(rank, step)]
            assert got["keys"] == want["keys"], (rank, step)
            worst = max(worst, float(np.max(np.abs(np.subtract(got["loss"], want["loss"])))))
    assert worst <= RESUME_TOLERANCE, worst
    return worst


def test_stop_and_resume_matches_uninterrupted_run(fitted, tmp_path) -> None:
    """Stopped at step 8 (mid-epoch: 10 micro-batches per rank and epoch), resumed to 16 with
    DataConfig.materialize (decode once, for small datasets): the resumed fit skips the consumed part of epoch 0 of
    the materialized input and goes on through epoch 1, and every (rank, step) sees the keys and losses of the
    uninterrupted streaming run. One stop and one resume show both behaviours (a resume continues exactly; the
    materialized input keeps the streaming order) instead of two pairs of fits, each fit being mostly fixed cost;
    streamed resumes are also in test_mixed_precision.py (bf16, ZeRO 1-3) and test_train_s3.py."""
    from imagen_core.checkpoint import TRAIN_FILE, load_checkpoint
    from pipelines.train.trainer import RunExists, prepare_run

    reference_config, reference = fitted(2)
    assert not reference_config.data.materialize
    config = dataclasses.replace(reference_config, output_dir=str(tmp_path), stop_at_step=8)
    stopped = train(config)
    assert stopped.metrics["step"] == 8 and json.loads(status_path(tmp_path, 0).read_text())["restored_step"] is None
    with pytest.raises(RunExists, match="resume=True"):
        prepare_run(dataclasses.replace(config, stop_at_step=None))
    materialized = dataclasses.replace(config.data, materialize=True)
    resumed = train(dataclasses.replace(config, stop_at_step=None, resume=True, data=materialized))
    assert json.loads(status_path(tmp_path, 0).read_text())["restored_step"] == 8
    assert resumed.mlflow_run_id == stopped.mlflow_run_id  # one MLflow run per stage training

    ledger, expected = read_ledger(tmp_path), read_ledger(reference_config.output_dir)
    # resumed inside epoch 0 (82 training rows: 10 micro-batches per rank and epoch), on into epoch 1
    assert [ledger[(0, step)]["epoch"] for step in (8, 9, 10, 11, STEPS)] == [0, 0, 0, 1, 1]
    worst = assert_same_trajectory(ledger, expected, STEPS)
    mine, _ = load_checkpoint(tmp_path / "export", filename=TRAIN_FILE)
    theirs, _ = load_checkpoint(pathlib.Path(reference_config.output_dir) / "export", filename=TRAIN_FILE)
    weight_diff = max((mine[k] - theirs[k]).abs().max().item() for k in mine)
    print(f"resume at 8 of {STEPS} (resumed on materialized input): max loss difference from the streaming run "
          f"{worst:.1e}, max weight difference {weight_diff:.1e}")
    assert weight_diff <= WEIGHT_TOLERANCE

    # Every sample once per epoch: the equal split and drop_last leave each rank floor(T/2/micro) batches.
    micro = config.scaling.micro_batch_size
    train_keys = {k for k in pq_keys(config) if not held_out(k, config.data.val_fraction)}
    per_epoch: dict[int, list[str]] = {}
    for (_, _), entry in sorted(ledger.items()):
        per_epoch.setdefault(entry["epoch"], []).extend(k for keys in entry["keys"] for k in keys)
    full_epoch = 2 * micro * (len(train_keys) // 2 // micro)
    assert len(per_epoch[0]) == full_epoch == len(set(per_epoch[0])) and set(per_epoch[0]) <= train_keys
    assert len(set(per_epoch[1])) == len(per_epoch[1]) and set(per_epoch[1]) <= train_keys
    final = pathlib.Path(resumed.checkpoint_dir)
    assert [TrainState.read(final, r).samples_seen for r in range(2)] == [STEPS * micro] * 2


def pq_keys(config) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(parquet_files(config.data.paths), columns=["key"])["key"].to_pylist()


def _wait_for(predicate, worker: threading.Thread, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert worker.is_alive(), f"the run finished before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kill9_recovers_from_the_last_valid_checkpoint(fitted, tmp_path) -> None:
    reference_config, _ = fitted(2)
    config = dataclasses.replace(reference_config, output_dir=str(tmp_path))
    outcome: dict[str, object] = {}
    worker = threading.Thread(target=lambda: outcome.update(result=train(config)), daemon=True)
    worker.start()
    run_dir = tmp_path / "ray" / config.run_name
    ledger_file = tmp_path / "ledger" / "rank1.jsonl"

    def registered() -> list[str]:
        # Ray Train rewrites its snapshot in place (not atomically): a read can see it empty or half written.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        for _ in range(100):
            if not snapshot.exists():
                return []
            try:
                return sorted(r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"])
            except json.JSONDecodeError:
                time.sleep(0.01)
        raise AssertionError(f"{snapshot} stayed unreadable for 1 s")

    def past_step_8() -> bool:
        done = len(ledger_file.read_text().splitlines()) if ledger_file.exists() else 0
        return done >= 9 and len(registered()) >= 2

    _wait_for(past_step_8, worker, "two checkpoints and step 9")
    # Damage the latest checkpoint (as a crash during its upload would), then kill -9 rank 1's process.
    victim_name = registered()[-1]
    victim = max((p for p in (run_dir / victim_name).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    pid = json.loads(status_path(tmp_path, 1).read_text())["pid"]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    # With rank 1 dead no further checkpoint can register: the newest intact one is where the run must resume.
    expected = max(int(n.split("_")[1]) for n in registered() if n != victim_name)
    worker.join(timeout=900)
    assert "result" in outcome, "the run did not complete after the kill"

    status = json.loads(status_path(tmp_path, 1).read_text())
    assert status["pid"] != pid and status["attempt"] >= 2
    assert status["restored_step"] == expected < int(victim_name.split("_")[1])
    recovery_s = status["first_step_done_at"] - killed_at
    worst = assert_same_trajectory(read_ledger(tmp_path), read_ledger(reference_config.output_dir), STEPS)
    print(f"kill -9 after step 9 of {STEPS}: first step after the restart {recovery_s:.1f} s after the kill; "
          f"restored from step {expected} ({victim_name} truncated); max loss difference {worst:.1e}")
