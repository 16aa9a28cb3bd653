"""The main job on the embedded default: a generated corpus served on 127.0.0.1 through the whole path.

corpus -> ingest (img2dataset over HTTP) -> curate (a CLIP fitted offline) -> embed (tiny T5) -> train base and
SR stages (DeepSpeed on Ray Train) -> evaluate, register and promote them in MLflow -> a sample grid for prompts
unseen in training from the champion cascade loaded back by alias.
Every step keeps its state on disk (pipelines/step.py), so a rerun skips what is finished, and the run is recorded
in MLflow as a parent run with a nested run per step (pipelines/workflow.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import random
import time
from typing import Any

from pipelines.curate import ClipScoreFilter, NearDupFilter, SelectConfig, SizeFilter, UnsafeFilter
from pipelines.ray_env import RayConfig, init_ray

log = logging.getLogger("imagen.demo")

DEMO_SELECT = SelectConfig(
    size=SizeFilter(min_side=32),
    # The tiny CLIP scores matched pairs ~0.9 and mismatched ~0; a pretrained CLIP needs its own threshold
    # (LAION used 0.28 with ViT-B/32) or the percentile mode.
    clip_score=ClipScoreFilter(mode="absolute", min_score=0.6),
    near_dup=NearDupFilter(threshold=0.9, max_thumbnail_mad=3.0),
    # The demo corpus holds nothing unsafe, and a CLIP fitted on shapes cannot recognise real unsafe concepts
    # zero-shot: its verdicts would be noise (measured: 254 of 380 rows flagged). Real runs keep it on.
    unsafe=UnsafeFilter(enabled=False),
)
"""The demo's curation thresholds, tuned for the tiny CLIP fitted on the demo's shapes."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class DemoConfig:
    run_dir: str = "runs/demo"
    """Where every step writes (corpus/, ingest/, curate/, embed/, train/<stage>/, samples.png, mlflow.db)."""
    num_images: int = 480
    """Rows of the generated URL list, junk included."""
    seed: int = 0
    """Seeds the corpus, the CLIP fit and training."""
    port: int = 0
    """Port of the local corpus server; 0 picks a free one on the first run and reuses it on reruns
    (the URLs, and so the ingest step's key, contain it)."""
    base_steps: int = 600
    """Optimiser steps of the base stage."""
    sr_steps: int = 400
    """Optimiser steps of the super-resolution stage."""
    micro_batch_size: int = 16
    """Per-worker micro-batch."""
    num_workers: int = 2
    """Ray Train workers (CPU processes over gloo here; one per GPU on a cluster)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage of both stages."""
    base_lr: float = 2e-3
    """Peak learning rate of the base stage (small nets, few steps: higher than the paper's 1e-4)."""
    sr_lr: float = 2e-3
    """Peak learning rate of the super-resolution stage."""
    ema_decay: float = 0.99
    """EMA decay per step (a horizon of ~100 steps: the paper's 0.9999 would average a 500-step run's start)."""
    ema_every: int = 5
    """Steps between EMA updates (each gathers the ZeRO partitions; the decay per update is ema_decay**ema_every)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: sqlite:///<run_dir>/mlflow.db."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None: all)."""

    def __post_init__(self) -> None:
        if self.num_images < 100:
            raise ValueError(f"num_images must be >= 100 so the CLIP fit and both stages have data, got {self.num_images}")
        if min(self.base_steps, self.sr_steps, self.micro_batch_size, self.num_workers) < 1:
            raise ValueError("base_steps, sr_steps, micro_batch_size and num_workers must be >= 1")

    @property
    def root(self) -> pathlib.Path:
        return pathlib.Path(self.run_dir).resolve()

    @property
    def mlflow_uri(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.root / 'mlflow.db'}"


def _serve_corpus(config: DemoConfig) -> tuple[Any, Any]:
    """Write the corpus once and serve it on the port it was written for."""
    from pipelines.demo_corpus import DemoCorpusConfig, serve_directory, write_demo_corpus

    corpus_dir = config.root / "corpus"
    state = corpus_dir / "served.json"
    port = json.loads(state.read_text())["port"] if state.exists() else config.port
    (corpus_dir / "www").mkdir(parents=True, exist_ok=True)
    try:
        server = serve_directory(corpus_dir / "www", port=port)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve the demo corpus on 127.0.0.1:{port} ({exc}); the corpus in {corpus_dir} was written for "
            "that port. Free it, or use a new --run-dir."
        ) from exc
    if not state.exists():
        corpus = DemoCorpusConfig(num_images=config.num_images, seed=config.seed, image_size=64)
        write_demo_corpus(corpus, corpus_dir, server.base_url)
        state.write_text(json.dumps({"port": int(server.base_url.rsplit(":", 1)[1])}))
    return server, corpus_dir / "urls.parquet"


def _fit_clip(config: DemoConfig) -> dict[str, Any]:
    """A tiny CLIP trained on separately generated pairs: the offline stand-in for a pretrained model."""
    from pipelines.clip_model import TinyClipFit, fit_tiny_clip
    from pipelines.demo_corpus import random_scene, render
    from pipelines.step import step_key

    rng = random.Random(config.seed + 10_000)  # other scenes than the corpus: like a model trained elsewhere
    scenes = [random_scene(rng) for _ in range(1024)]
    fit = TinyClipFit(seed=config.seed)
    checkpoint = fit_tiny_clip([render(s, 64) for s in scenes], [s.caption() for s in scenes], config.root / "clip", fit)
    return {"key": step_key("fit_clip", fit, []), "checkpoint": str(checkpoint)}


def demo_text_encoder(clip: Any) -> Any:
    """The demo's frozen text encoder: the per-token outputs of the fitted CLIP's text tower.

    Imagen's finding is that the frozen text encoder's knowledge drives image-text alignment (Sec 4.4: scaling
    the encoder helps more than scaling the U-Net). Offline there is no pretrained T5; a random-init one knows
    no words, and the base stage then learned colours from it several times slower (measured on the demo
    corpus, 500 steps of 32: background colour right in 0.19 of unseen prompts with the random T5, 0.75 with
    this tower). The CLIP fitted for curation is the offline stand-in for a pretrained encoder.
    """
    from imagen_core.text_encoder import TextEncoderConfig

    return TextEncoderConfig(kind="open_clip", name=clip.model_name, max_length=32)


def _train(
    config: DemoConfig, recipe: str, steps: int, lr: float, embed_dir: pathlib.Path, ray_config: RayConfig,
    text_encoder: Any, mlflow_tags: dict[str, str],
) -> dict[str, Any]:
    """Train one stage, or return the finished training's result (keyed by the config: a rerun skips the stage)."""
    from imagen_core.recipes import stage_recipe
    from pipelines.train.config import (
        CheckpointConfig,
        DataConfig,
        OptimConfig,
        ScalingConfig,
        ScheduleConfig,
        TrackingConfig,
        TrainConfig,
    )
    from pipelines.train.trainer import run_exists, train_stage

    stage = dataclasses.replace(stage_recipe(recipe), text_encoder=text_encoder)
    output_dir = config.root / "train" / stage.name
    storage = str(output_dir / "ray")
    train = TrainConfig(
        stage=stage,
        output_dir=str(output_dir),
        run_name=stage.name,
        total_steps=steps,
        resume=run_exists(storage, stage.name),
        seed=config.seed,
        data=DataConfig(paths=(str(embed_dir / "shards"),), val_fraction=VAL_FRACTION, materialize=True),
        optim=OptimConfig(kind="adam", lr=lr, ema_decay=config.ema_decay**config.ema_every, ema_every=config.ema_every),
        schedule=ScheduleConfig(warmup_steps=min(50, steps)),
        checkpoint=CheckpointConfig(every_steps=max(steps // 3, 1), num_to_keep=2, storage_path=storage),
        tracking=TrackingConfig(
            tracking_uri=config.mlflow_uri, experiment="imagen-demo", log_every=20,
            val_every=max(steps // 3, 1), sample_every=steps, num_samples=8,
        ),
        scaling=ScalingConfig(
            num_workers=config.num_workers, cpus_per_worker=0.5, zero_stage=config.zero_stage,
            micro_batch_size=config.micro_batch_size,
        ),
    )
    # The finished run's result, keyed by its config, makes a rerun skip the stage (Ray Train would restart
    # the workers only to find the run at its last step).
    from pipelines.step import atomic_write_json, step_key

    key = step_key("train", dataclasses.replace(train, resume=False), [])
    done = output_dir / "result.json"
    if done.exists() and (saved := json.loads(done.read_text()))["key"] == key:
        return {**saved.pop("result", {}), **saved}  # a result.json of the earlier layout nests the fields
    result = {"key": key, **dataclasses.asdict(train_stage(train, ray_config, mlflow_tags=mlflow_tags))}
    atomic_write_json(done, result)
    return result


def _report(config: DemoConfig, curated: dict[str, Any]) -> dict[str, Any]:
    """The curation report, once per curation (report.json is written last by `report`)."""
    from pipelines.report import report
    from pipelines.step import step_key

    key = step_key("report", {}, [curated["key"]])
    written = config.root / "curate" / "report" / "report.json"
    if written.exists():
        return {"key": key, **json.loads(written.read_text())}
    return {"key": key, **report(config.root / "curate", ingest_dir=config.root / "ingest",
                                 tracking_uri=config.mlflow_uri, experiment="imagen-demo")}


def _unseen_prompts(embed_dir: pathlib.Path, count: int, seed: int) -> list[str]:
    """Captions of the demo's grammar that no training row has."""
    import pyarrow.dataset as ds

    from pipelines.demo_corpus import random_scene

    seen = set(ds.dataset(str(embed_dir / "shards"), format="parquet").to_table(columns=["caption"])["caption"].to_pylist())
    rng, prompts = random.Random(seed + 20_000), []
    while len(prompts) < count:
        caption = random_scene(rng).caption()
        if caption not in seen and caption not in prompts:
            prompts.append(caption)
    return prompts


VAL_FRACTION = 0.05
"""Share of keys the trainer holds out (by key hash); evaluation uses the same rows."""
MODEL_NAME = "imagen-demo"


def _export_heldout(embed_dir: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    """The held-out rows as <key>.png + <key>.txt (img2dataset's "files" layout), for evaluation."""
    import pyarrow.dataset as ds

    from pipelines.step import atomic_write_bytes
    from pipelines.train.data import held_out

    if (out_dir / "_done").exists():
        return out_dir
    table = ds.dataset(str(embed_dir / "shards"), format="parquet").to_table(columns=["key", "caption", "image"])
    for key, caption, image in zip(*(table[c].to_pylist() for c in ("key", "caption", "image"))):
        if held_out(key, VAL_FRACTION):
            atomic_write_bytes(out_dir / f"{key}.png", image)  # any PIL-readable bytes; the suffix only marks images
            atomic_write_bytes(out_dir / f"{key}.txt", caption.encode())
    (out_dir / "_done").touch()
    return out_dir


def _register_and_promote(
    config: DemoConfig, results: dict[str, Any], heldout_dir: pathlib.Path, prompts: list[str]
) -> dict[str, Any]:
    """Register each stage (challenger), evaluate it, promote it on val_loss, register the cascade.

    Keyed by the exported weights: a rerun with the same weights reuses the decision instead of adding versions.
    """
    from imagen_core.checkpoint import read_manifest
    from pipelines.registry.evaluate import EvalConfig, evaluate_stage
    from pipelines.registry.promote import promote
    from pipelines.registry.register import CascadeSpec, RegisterConfig, register_cascade, register_stage
    from pipelines.tracking import configure_tracking
    from pipelines.step import StepDir

    weights = [read_manifest(r["export_dir"])["files"]["model.safetensors"]["sha256"] for r in results.values()]
    step = StepDir.open(config.root / "registry", "register", {"name": MODEL_NAME, "uri": config.mlflow_uri}, weights)
    if (manifest := step.manifest()) is not None:
        return manifest
    configure_tracking(config.mlflow_uri)
    for stage, result in results.items():
        if step.is_done(stage):  # registered and decided before an interruption: no second version
            continue
        version = register_stage(
            result["export_dir"], MODEL_NAME,
            RegisterConfig(training_run_id=result["mlflow_run_id"], dataset_manifest=str(config.root / "embed" / "manifest.json"),
                           experiment="imagen-demo"),
        )
        evaluation = evaluate_stage(
            MODEL_NAME, stage, version=version,
            config=EvalConfig(heldout_dir=str(heldout_dir), prompts=tuple(prompts), num_samples=len(prompts)),
        )
        decision = promote(MODEL_NAME, stage, "val_loss", min_rel=0.01)
        step.mark_done(stage, {"version": version, "metrics": evaluation.metrics, "notes": evaluation.notes,
                               "promotion": decision.summary()})
    cascade_version = register_cascade(MODEL_NAME, CascadeSpec(stages=tuple(results)))
    return step.finish(list(results), model_uri=f"models:/{MODEL_NAME}@champion", cascade_version=cascade_version)


def _sample_grid(config: DemoConfig, registry: dict[str, Any], prompts: list[str]) -> dict[str, Any]:
    """The registered champion cascade, loaded back by alias, sampled for prompts unseen in training; the grid
    and the colour checks of its output (pipelines/registry/colour.py) after the base and after the last stage."""
    from pipelines.registry import load_cascade
    from pipelines.registry.colour import background_accuracy, colour_accuracy
    from pipelines.registry.images import png_bytes
    from pipelines.report import Cell, contact_sheet, save_png
    from pipelines.step import atomic_write_json, step_key

    outputs = load_cascade(registry["model_uri"], tracking_uri=config.mlflow_uri).cascade.sample(prompts, seed=config.seed)
    cells = [Cell(image=png_bytes(img), lines=(prompt,)) for img, prompt in zip(outputs[-1], prompts)]
    grid = save_png(contact_sheet(cells, cell_px=128, cols=4), config.root / "samples.png")
    checks = {"key": step_key("sample", prompts, [registry["key"]]), "grid": str(grid), "prompts": len(prompts)}
    for name, images in (("base", outputs[0]), ("cascade", outputs[-1])):
        checks[f"{name}_colour_accuracy"] = colour_accuracy(images, prompts)[0]
        checks[f"{name}_background_accuracy"] = background_accuracy(images, prompts)[0]
    atomic_write_json(config.root / "samples.json", checks)
    return checks


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run (or resume) the whole demo; returns a summary of every step."""
    from pipelines.clip_model import ClipConfig
    from pipelines.curate import CurateConfig, ScoreConfig, curate
    from pipelines.embed import EmbedConfig, embed
    from pipelines.fetch_policy import FetchPolicyConfig
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.url_lists import UrlListConfig
    from pipelines.workflow import PipelineRun

    root = config.root
    root.mkdir(parents=True, exist_ok=True)
    ray_config = RayConfig(num_cpus=config.num_cpus)
    with PipelineRun(root, config.mlflow_uri, "imagen-demo", "demo", params=dataclasses.asdict(config)) as pipeline:
        server, url_list = _serve_corpus(config)
        try:
            init_ray(ray_config)
            ingest = IngestConfig(
                url_list=UrlListConfig(paths=(str(url_list),)),
                output_dir=str(root / "ingest"),
                rows_per_shard=160,
                image_size=64,
                policy=FetchPolicyConfig(allow_loopback=True),  # the corpus is served on 127.0.0.1
            )
            ingested = pipeline.step("ingest", lambda: run_ingest(ingest, ray_config))
        finally:
            server.stop()
        clip = ClipConfig.tiny(pipeline.step("fit_clip", lambda: _fit_clip(config))["checkpoint"])
        curate_config = CurateConfig(score=ScoreConfig(clip=clip), select=DEMO_SELECT)
        curated = pipeline.step("curate", lambda: curate(root / "ingest", root / "curate", curate_config))
        pipeline.step("report", lambda: _report(config, curated))
        text_encoder = demo_text_encoder(clip)
        embedded = pipeline.step("embed", lambda: embed(root / "curate", root / "embed", EmbedConfig(text_encoder=text_encoder)))
        trained = {
            stage: pipeline.step(f"train_{stage}", lambda: _train(
                config, recipe, steps, lr, root / "embed", ray_config, text_encoder, pipeline.nested_tags))
            for stage, recipe, steps, lr in (("base", "demo_base", config.base_steps, config.base_lr),
                                             ("sr1", "demo_sr", config.sr_steps, config.sr_lr))
        }
        prompts = _unseen_prompts(root / "embed", 16, config.seed)
        heldout = _export_heldout(root / "embed", root / "heldout")
        registry = pipeline.step("register", lambda: _register_and_promote(config, trained, heldout, prompts))
        samples = pipeline.step("sample", lambda: _sample_grid(config, registry, prompts))
        summary = {
            "run_dir": str(root),
            "ingest": {k: ingested.get(k) for k in ("input_rows", "downloaded", "failed", "by_status")},
            "curate_funnel": curated.get("funnel"),
            "embed": {k: v for k, v in embedded.items() if k != "shards"},
            "train": {stage: {"export": r["export_dir"], "mlflow_run_id": r["mlflow_run_id"], "metrics": r["metrics"]}
                      for stage, r in trained.items()},
            "registry": {k: registry[k] for k in ("model_uri", "cascade_version", "shards")},
            "samples": samples,
            "prompts": prompts,
            "mlflow": config.mlflow_uri,
            "mlflow_run_id": pipeline.run_id,
            "steps": pipeline.summary(),
            "timings_s": {name: step["seconds"] for name, step in pipeline.summary().items()},
        }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
