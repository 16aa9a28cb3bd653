"""The per-worker training loop that Ray Train runs on every rank (one rank per GPU, or a CPU process).

Every rank runs the same sequence of collectives (DeepSpeed steps, gathers for the EMA, checkpoint saves,
metric reductions) at the same steps: which steps do what is a function of the step number only.
Base and SR stages run this same loop; the StageConfig decides everything stage-specific.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines import storage
from pipelines.storage import StoragePath
from pipelines.train import checkpointing
from pipelines.train.checkpointing import TrainState
from pipelines.train.config import TrainConfig
from pipelines.train.data import Batch, Collate, epoch_batches, parquet_files, read_val_rows
from pipelines.train.engine import build_engine, grad_norm_recorded, manual_grad_norm, memory_stats, noise_seed
from pipelines.train.ledger import Ledger, write_status
from pipelines.train.validation import first_rows, sample_grid, validation_loss
from pipelines.train.weights import FullWeights

EXPORT_DIR = "export"
MEMORY_FILE = "memory.json"


@dataclasses.dataclass(kw_only=True, frozen=True)
class WorkerSpec:
    """What the driver resolved, handed to every worker as one object."""

    config: TrainConfig
    deepspeed: dict[str, Any]
    """The resolved DeepSpeed config (pipelines.train.dsconfig)."""
    embed_dim: int
    """D of the text embeddings in the training Parquet."""
    mlflow_run_id: str
    tracking_uri: str

    @property
    def micro_batch(self) -> int:
        return int(self.deepspeed["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.deepspeed["gradient_accumulation_steps"])


@dataclasses.dataclass
class StepRecord:
    """What one optimiser step did on this rank."""

    losses: list[float]
    keys: list[list[str]]
    epoch: int
    data_wait_s: float
    step_s: float
    grad_norm: float
    lr: float


def micro_batches(
    shard: Any, state: TrainState, spec: WorkerSpec, rank: int, collate: Collate
) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index in epoch, batch) from the saved position on, epoch after epoch."""
    cfg = spec.config
    epoch, skip = state.epoch, state.batches_in_epoch
    while True:
        produced = skip
        for index, batch in epoch_batches(shard, epoch=epoch, skip=skip, micro_batch=spec.micro_batch,
                                          collate=collate.for_epoch(epoch),
                                          data=cfg.data, seed=cfg.seed, rank=rank):
            produced = index + 1
            yield epoch, index, batch
        if produced == 0:
            raise RuntimeError(
                f"rank {rank} got no complete micro-batch of {spec.micro_batch} in epoch {epoch}: the training "
                f"split is smaller than workers x micro-batch; add data or lower the micro-batch size"
            )
        epoch, skip = epoch + 1, 0


class Trainer:
    """One rank's state: the engine, rank 0's full weights + EMA, the data position, the outputs."""

    def __init__(self, spec: WorkerSpec, rank: int, world: int, state: TrainState, restore_from: Path | None) -> None:
        self.spec, self.cfg = spec, spec.config
        self.rank, self.world, self.state = rank, world, state
        self.output_dir = storage.path(self.cfg.output_dir)
        self._val = self._read_val_in_background() if rank == 0 else None
        self.engine = build_engine(self.cfg, spec.deepspeed)
        self.device = self.engine.device
        self.weights = FullWeights(self.cfg.stage_config, self.rank)
        self.weights.gather(self.engine)
        self.weights.start_ema()
        if restore_from is not None:
            checkpointing.load(restore_from, self.engine, self.weights)
        # Checkpoint directories carry a token of this attempt: after a fallback to an older checkpoint the
        # same step is saved again, and must not land in (and later be rotated out with) the damaged one.
        self.attempt = _broadcast_token(self.rank)
        self.ledger = Ledger(self.output_dir, self.rank) if self.cfg.data.ledger else None
        self.logger = None
        if self.rank == 0:
            from pipelines.train.tracking import RunLogger

            self.logger = RunLogger(spec.tracking_uri, spec.mlflow_run_id)
        self.last_metrics: dict[str, float] = {}

    # -- one optimiser step ------------------------------------------------------------------------------
    def step(self, stream: Iterator[tuple[int, int, Batch]]) -> StepRecord:
        engine, gas = self.engine, self.spec.grad_accum
        start = time.perf_counter()
        wait, losses, keys, norm = 0.0, [], [], float("nan")
        for micro in range(gas):
            before = time.perf_counter()
            epoch, index, batch = next(stream)
            wait += time.perf_counter() - before
            self.state.epoch, self.state.batches_in_epoch = epoch, index + 1
            # fp32 whatever the engine's precision: the stage keeps the diffusion maths (x_t, targets, loss) in
            # fp32 and the U-Net casts its inputs to its weights' dtype (bf16/fp16 under DeepSpeed's modes).
            batch = batch.to(self.device, torch.float32)
            generator = torch.Generator(device=self.device).manual_seed(
                noise_seed(self.cfg.seed, self.state.step, micro, self.rank))
            loss = engine(batch.images, batch.text_embeds, batch.text_mask, batch.lowres, generator=generator).mean()
            engine.backward(loss)
            if micro == gas - 1 and not grad_norm_recorded(engine):
                norm = manual_grad_norm(engine)
            lr = engine.get_lr()[0]  # the lr this step uses (the scheduler advances in engine.step)
            engine.step()
            losses.append(float(loss.detach().float()))
            keys.append(batch.keys)
            self.state.samples_seen += len(batch)
        if grad_norm_recorded(engine):
            norm = float(engine.get_global_grad_norm())
        self.state.step += 1
        return StepRecord(losses=losses, keys=keys, epoch=self.state.epoch, data_wait_s=wait,
                          step_s=time.perf_counter() - start, grad_norm=norm, lr=lr)

    # -- periodic work (same decision on every rank) ----------------------------------------------------
    def due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.cfg.last_step

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def gathered_memory(self) -> list[dict[str, float]]:
        import torch.distributed as dist

        per_rank: list[Any] = [None] * self.world
        dist.all_gather_object(per_rank, memory_stats(self.engine))
        return per_rank

    def _read_val_in_background(self) -> concurrent.futures.Future:
        collate = Collate(self.spec.embed_dim, self.cfg.stage.text_encoder.max_length)
        micro, cfg = self.spec.micro_batch, self.cfg

        def read() -> list[Batch]:
            rows = read_val_rows(parquet_files(cfg.data.paths), cfg.data, cfg.stage.image_size, cfg.stage.lowres_size)
            count = len(rows.get("key", ()))
            return [collate({name: column[i:i + micro] for name, column in rows.items()}) for i in range(0, count, micro)]

        return in_background(read)

    def val_batches(self) -> list[Batch]:
        """Held-out batches (bounded by val_max_samples), read once on rank 0 and kept."""
        return self._val.result()

    def validate(self) -> dict[str, float]:
        """Rank 0, on the gathered weights: validation loss of the EMA and of the training weights."""
        tracking = self.cfg.tracking
        batches = self.val_batches()
        with self.weights.on_device(self.device) as module:
            train_loss = validation_loss(module, batches, timesteps=tracking.val_timesteps, seed=tracking.val_seed)
        with self.weights.ema_weights(self.device) as module:
            ema_loss = validation_loss(module, batches, timesteps=tracking.val_timesteps, seed=tracking.val_seed)
        return {"val_loss": ema_loss, "val_loss_train_weights": train_loss}

    def sample(self) -> None:
        """Rank 0: a grid of EMA samples for the fixed held-out prompts, logged as a PNG artifact."""
        tracking = self.cfg.tracking
        batches = self.val_batches()
        if not batches:
            return
        rows = first_rows(batches, tracking.num_samples)
        with self.weights.ema_weights(self.device) as module:
            png = sample_grid(module, rows, steps=tracking.sample_steps, seed=tracking.val_seed)
        name = f"step_{self.state.step:08d}"
        self.logger.artifact_bytes(png, "samples", f"{name}.png")
        self.logger.artifact_bytes(json.dumps({"step": self.state.step, "keys": rows.keys, "captions": rows.captions},
                                              indent=2).encode(), "samples", f"{name}.json")

    def checkpoint(self, metrics: dict[str, float]) -> None:
        """Collective: save this rank's part, report it to Ray Train (merged into one checkpoint in storage)."""
        import ray.train

        if self.ledger is not None:
            self.ledger.flush()  # on an object store: the steps up to this checkpoint, as one segment
        local = Path(tempfile.mkdtemp(prefix=f"ckpt-{self.state.step:08d}-rank{self.rank}-"))
        try:
            checkpointing.save(self.engine, self.weights, self.state, self.cfg.stage.to_dict(), self.rank, self.world,
                               local)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                             checkpoint_dir_name=f"checkpoint_{self.state.step:08d}_{self.attempt}")
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def export(self) -> StoragePath:
        """Rank 0 (after a gather): the consolidated stage checkpoint in imagen_core's format: EMA weights as
        model.safetensors (what sampling and the registry load), raw weights as train.safetensors, the
        StageConfig in config.json, so it rebuilds with nothing else: a text encoder the StageConfig names by a
        local path is copied into the export (text_encoder/, named "checkpoint:..." in config.json), so the export
        loads on another machine and from another directory. Written in place on a local output_dir; on an object
        store written to a local temporary folder and uploaded (`upload_export`). Replaced whole either way."""
        directory = self.output_dir / EXPORT_DIR
        extra = {"step": self.state.step, "run_name": self.cfg.run_name, "samples_seen": self.state.samples_seen}
        if directory.is_local:
            if directory.local.exists():
                shutil.rmtree(directory.local)  # a previous fit's export: replaced whole, never mixed
            self._write_export(directory.local, extra)
            return directory
        with tempfile.TemporaryDirectory(prefix="export-") as tmp:
            self._write_export(Path(tmp), extra)
            upload_export(Path(tmp), directory)
        return directory

    def _write_export(self, directory: Path, extra: dict[str, Any]) -> None:
        from imagen_core.checkpoint import carry_text_encoder, save_training_checkpoint

        save_training_checkpoint(directory, self.weights.module, self.weights.ema, self.cfg.stage.to_dict(), extra)
        carry_text_encoder(directory)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()


def upload_export(local: Path, target: StoragePath) -> None:
    """Replace the export at `target` (an object-store folder) with the local folder's files, so that no reader
    takes a mix for a finished export: the old config.json (the manifest, what makes a folder a checkpoint) goes
    first, the new one is uploaded last, then files the new export does not have are deleted."""
    from imagen_core.checkpoint import CONFIG_FILE

    old = {f.relative_to(target) for f in target.files(recursive=True)}
    manifest = target / CONFIG_FILE
    if CONFIG_FILE in old:
        manifest.remove()
    new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in new:
        if name != CONFIG_FILE:
            storage.copy_tree(storage.path(local / name), target / name)
    storage.copy_tree(storage.path(local / CONFIG_FILE), manifest)
    for name in sorted(old - set(new)):
        (target / name).remove()


def _log_entry(trainer: Trainer, record: StepRecord) -> dict[str, Any]:
    return {"rank": trainer.rank, "step": trainer.state.step, "epoch": record.epoch, "keys": record.keys,
            "loss": record.losses, "samples_seen": trainer.state.samples_seen, "time": time.time()}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: `loop_config["spec"]` is the WorkerSpec."""
    from tqdm import tqdm

    import ray.train

    spec: WorkerSpec = loop_config["spec"]
    cfg = spec.config
    if not cfg.scaling.use_gpu:  # CPU workers share the machine: one intra-op thread per reserved CPU
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    output_dir = storage.path(cfg.output_dir)
    write_status(output_dir, rank, phase="starting")
    with checkpointing.latest_valid(rank, world) as found:
        state = found.state if found else TrainState(world_size=world)
        collate = Collate(spec.embed_dim, cfg.stage.text_encoder.max_length, cfg.train_crop)
        # The first micro-batch is fetched while DeepSpeed initialises (Ray Data start-up takes seconds).
        stream = Prefetch(micro_batches(ray.train.get_dataset_shard("train"), state, spec, rank, collate))
        trainer = Trainer(spec, rank, world, state, found.directory if found else None)
    # restored_files: what this rank downloaded from remote checkpoint storage (None: none, or read in place).
    write_status(output_dir, rank, phase="training", restored_step=state.step if found else None,
                 restored_files=found.fetched if found else None,
                 restored_from=found.checkpoint_path if found else None)
    progress = tqdm(total=cfg.last_step, initial=state.step, desc=f"train {cfg.stage.name}",
                    disable=rank != 0, mininterval=5.0)
    window: list[StepRecord] = []
    first = True
    while state.step < cfg.last_step:
        record = trainer.step(stream)
        window.append(record)
        progress.update(1)
        if first:
            write_status(output_dir, rank, phase="training", first_step_done_at=time.time(), first_step=state.step)
            first = False
        if trainer.ledger is not None:
            trainer.ledger.append(_log_entry(trainer, record))
        _periodic(trainer, window, progress)
    progress.close()
    stream.close()
    trainer.close()


def in_background(fn: Any) -> concurrent.futures.Future:
    """Run fn in a thread; .result() waits for it and re-raises its error."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future


class Prefetch:
    """An iterator whose first item is fetched in a background thread from construction on."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self._iterator = iterator
        self._first: concurrent.futures.Future | None = in_background(lambda: next(iterator))

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        if self._first is None:
            return next(self._iterator)
        first, self._first = self._first, None
        return first.result()

    def close(self) -> None:
        """Stop the underlying generator (and with it the Ray Data execution of the current epoch)."""
        if self._first is not None:
            self._first.exception()
            self._first = None
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _broadcast_token(rank: int) -> str:
    import torch.distributed as dist

    token = [uuid.uuid4().hex[:6] if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    return token[0]


def _periodic(trainer: Trainer, window: list[StepRecord], progress: Any) -> None:
    """Logging, EMA, validation, samples, checkpoint and export at the steps they are due (all ranks agree)."""
    cfg, state = trainer.cfg, trainer.state
    last = state.step == cfg.last_step
    tracking = cfg.tracking
    log_due, val_due = trainer.due(tracking.log_every), trainer.due(tracking.val_every)
    sample_due = trainer.due(tracking.sample_every)
    ema_due = state.step % cfg.optim.ema_every == 0
    if ema_due or val_due or sample_due or last:
        trainer.weights.gather(trainer.engine)
    if ema_due:
        trainer.weights.update_ema(cfg.optim.ema_decay)
    metrics: dict[str, float] = {}
    if log_due:
        metrics.update(_window_metrics(trainer, window))
        window.clear()
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
    if trainer.rank == 0 and val_due:
        metrics.update(trainer.validate())
    if trainer.rank == 0 and sample_due:
        trainer.sample()
    if trainer.rank == 0 and metrics:
        trainer.logger.metrics(metrics, step=state.step)
    trainer.last_metrics.update(metrics)
    if last and trainer.rank == 0:
        trainer.export()
    if trainer.due(cfg.checkpoint.every_steps):
        report = {**trainer.last_metrics, "step": state.step, "samples_seen_rank": state.samples_seen}
        trainer.checkpoint(report)


def _window_metrics(trainer: Trainer, window: list[StepRecord]) -> dict[str, float]:
    """Collective: metrics over the steps since the last log, loss averaged over ranks."""
    spec, state = trainer.spec, trainer.state
    losses = [sum(r.losses) / len(r.losses) for r in window]
    step_s = sum(r.step_s for r in window)
    loss, samples_seen = trainer.mean_over_ranks([sum(losses) / len(losses), float(state.samples_seen)])
    images = len(window) * spec.micro_batch * spec.grad_accum * trainer.world
    # Throughput and data wait over the steps themselves (waiting for data + forward/backward/step); the
    # periodic work (checkpoints, validation, grids) is excluded: it is logged by its own cadence.
    metrics = {
        "loss": loss,
        "lr": window[-1].lr,
        "grad_norm": window[-1].grad_norm,
        "images_per_s": images / step_s if step_s > 0 else float("nan"),
        "data_wait_fraction": sum(r.data_wait_s for r in window) / step_s if step_s > 0 else float("nan"),
        "samples_seen": samples_seen * trainer.world,
        "epoch": float(window[-1].epoch),
    }
    memory = trainer.gathered_memory()
    for rank, stats in enumerate(memory):
        for name, value in stats.items():
            metrics[f"memory/rank{rank}/{name}"] = float(value)
    if trainer.rank == 0:
        from pipelines.step import atomic_write_json

        zero = spec.deepspeed["zero_optimization"]["stage"]
        record = {"step": state.step, "per_rank": memory, "zero_stage": zero}
        atomic_write_json(trainer.output_dir / MEMORY_FILE, record)
    return metrics
