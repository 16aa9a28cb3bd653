"""The `imagen` console script: parse, build the typed config, run, print a summary. No work at import."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

Command = Callable[[argparse.Namespace], Any]

# Errors that say what the user got wrong and what to do: printed without a traceback (exit code 2).
# Matched by name so that no heavy package is imported to catch them.
USER_ERRORS = frozenset({
    "UrlListError", "ConfigError", "TextEncoderWeightsError", "ClipWeightsUnavailable", "CheckpointError",
    "StepKeyMismatch", "RunExists", "TrackingUnavailable", "FileNotFoundError",
})


def _print(result: Any) -> None:
    """The command's result as JSON on stdout (a dataclass result as its fields)."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    print(json.dumps(result, indent=2, default=str))


# -- demo ---------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> Any:
    from pipelines.demo import DemoConfig, run_demo

    given = {
        "run_dir": args.run_dir, "num_images": args.num_images, "base_steps": args.base_steps,
        "sr_steps": args.sr_steps, "num_workers": args.workers, "tracking_uri": args.tracking_uri, "seed": args.seed,
    }
    config = DemoConfig(**{k: v for k, v in given.items() if v is not None})
    summary = run_demo(config)
    samples = summary["samples"]
    print(f"\nsamples for prompts unseen in training: {samples['grid']}\n"
          f"background colour right in {samples['cascade_background_accuracy']:.2f} of them, every named colour "
          f"shown in {samples['cascade_colour_accuracy']:.2f} (chance: about 1/13 for the background)")
    for stage in summary["registry"]["shards"]:
        metrics = stage["metrics"]
        if "psnr" in metrics:
            print(f"{stage['shard_id']} on held-out images: PSNR {metrics['psnr']:.1f} dB against the ground truth, "
                  f"bicubic upsampling {metrics['psnr_bicubic']:.1f} dB")
    print(f"MLflow: run {summary['mlflow_run_id']} (a nested run per step); "
          f"mlflow ui --backend-store-uri {summary['mlflow']}")
    return summary


# -- data ---------------------------------------------------------------------------------------------------
def _ray(args: argparse.Namespace) -> Any:
    from pipelines.ray_env import RayConfig

    return RayConfig(address=args.ray_address, num_cpus=args.num_cpus)


def _ingest(args: argparse.Namespace) -> Any:
    from pipelines.fetch_policy import FetchPolicyConfig
    from pipelines.ingest import IngestConfig, run_ingest
    from pipelines.url_lists import UrlListConfig, validate_url_list

    urls = UrlListConfig(paths=tuple(args.urls), url_column=args.url_column, caption_column=args.caption_column)
    validate_url_list(urls)  # seconds, before Ray starts: a bad list fails here
    config = IngestConfig(
        url_list=urls, output_dir=args.out, rows_per_shard=args.rows_per_shard, image_size=args.image_size,
        policy=FetchPolicyConfig(allow_loopback=args.allow_loopback),
    )
    return run_ingest(config, _ray(args))


def _clip_config(args: argparse.Namespace) -> Any:
    from pipelines.clip_model import ClipConfig

    return ClipConfig(model_name=args.clip_model, pretrained=args.clip_pretrained)


def _curate(args: argparse.Namespace) -> Any:
    from pipelines.curate import CurateConfig, ScoreConfig, curate
    from pipelines.ray_env import init_ray

    config = CurateConfig(score=ScoreConfig(clip=_clip_config(args)))
    init_ray(_ray(args))
    return curate(args.ingest, args.out, config)


def _embed(args: argparse.Namespace) -> Any:
    from imagen_core.text_encoder import TextEncoderConfig
    from pipelines.embed import EmbedConfig, embed
    from pipelines.ray_env import init_ray

    config = EmbedConfig(text_encoder=TextEncoderConfig(kind=args.encoder_kind, name=args.encoder))
    init_ray(_ray(args))
    return embed(args.curate, args.out, config)


def _search(args: argparse.Namespace) -> Any:
    from pipelines.search import search

    return search(args.data, args.query, clip=_clip_config(args), k=args.k, out_png=args.out)


def _report(args: argparse.Namespace) -> Any:
    from pipelines.report import report

    return report(args.curate, ingest_dir=args.ingest, tracking_uri=args.tracking_uri)


# -- train --------------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> Any:
    from imagen_core.config_io import load_file
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import train_stage

    overrides = [*args.set, *(["resume=true"] if args.resume else [])]
    return train_stage(TrainConfig.from_dict(load_file(args.config), overrides), _ray(args))


# -- registry and sampling ---------------------------------------------------------------------------------
def _tracking(args: argparse.Namespace) -> None:
    """Check the tracking server in seconds, before anything loads (unreachable -> a clear error)."""
    from pipelines.tracking import configure_tracking

    configure_tracking(args.tracking_uri)


def _register(args: argparse.Namespace) -> Any:
    from pipelines.registry import RegisterConfig, register_stage

    _tracking(args)
    return {"model": args.name, "version": register_stage(args.checkpoint, args.name, RegisterConfig(training_run_id=args.run_id))}


def _promote(args: argparse.Namespace) -> Any:
    from pipelines.registry.metrics import MetricSpec
    from pipelines.registry.promote import promote

    _tracking(args)
    decision = promote(args.name, args.stage, MetricSpec(args.metric, direction=args.direction), min_abs=args.min_abs,
                       min_rel=args.min_rel, force=args.force, reason=args.reason)
    return decision.summary()


def _rollback(args: argparse.Namespace) -> Any:
    from pipelines.registry import rollback

    _tracking(args)
    return rollback(args.name, args.stage, reason=args.reason)


def _list(args: argparse.Namespace) -> Any:
    from pipelines.registry import list_stages

    _tracking(args)
    print(list_stages(args.name).to_string(index=False))


def _source(args: argparse.Namespace) -> Any:
    if bool(args.model) == bool(args.checkpoint):
        raise SystemExit("imagen: error: give either --model models:/NAME@ALIAS or --checkpoint DIR [DIR ...]")
    if args.model:
        _tracking(args)
        return args.model
    return args.checkpoint


def _sample_config(args: argparse.Namespace) -> Any:
    from pipelines.registry import SampleConfig

    return SampleConfig(sampler=args.sampler, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        device=args.device)


def _progress() -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, step: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=f"sampling {stage}", unit="step"))
        bar.update(1)
        if step + 1 >= total:
            bar.close()

    return update


def _report_outputs(outputs: Any) -> Any:
    for out in outputs:
        print(f"withheld ({out.withheld}): {out.prompt}" if out.withheld else f"wrote {out.path}")
    return None


def _sample(args: argparse.Namespace) -> Any:
    from pipelines.registry import sample_images
    from pipelines.registry.images import write_png

    outputs = sample_images(_source(args), args.prompts, _sample_config(args), safety=_safety(args), progress=_progress())
    for i, out in enumerate(outputs):
        if out.image is not None:
            path = args.output if len(outputs) == 1 else f"{args.output.removesuffix('.png')}_{i}.png"
            out.path = write_png(out.image, path)
    return _report_outputs(outputs)


def _upscale(args: argparse.Namespace) -> Any:
    from pipelines.registry import upscale

    out = upscale(_source(args), args.image, args.output, prompt=args.prompt, config=_sample_config(args),
                  safety=_safety(args), progress=_progress())
    return _report_outputs([out])


def _edit(args: argparse.Namespace) -> Any:
    from pipelines.registry import EditConfig, edit

    out = edit(_source(args), args.image, args.mask, args.prompt, args.output,
               config=EditConfig(sample=_sample_config(args)), safety=_safety(args), progress=_progress())
    return _report_outputs([out])


def _safety(args: argparse.Namespace) -> Any:
    """The output safety check, with the CLIP that curation used (none given: no check, said aloud)."""
    if args.safety_clip is None:
        print("note: no --safety-clip given, so outputs are not screened for unsafe content", file=sys.stderr)
        return None
    from pipelines.clip_model import ClipConfig
    from pipelines.registry import SafetyChecker, SafetyConfig

    return SafetyChecker(SafetyConfig(clip=ClipConfig(model_name=args.safety_clip, pretrained=args.safety_clip_pretrained)))


# -- the parser ---------------------------------------------------------------------------------------------
def _add_ray(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None, help="Ray cluster address ('auto' on a cluster node); default: local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")


def _add_clip(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-model", required=True, help="open_clip architecture (e.g. ViT-L-14) or local-dir:<folder>")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag (e.g. openai) or a checkpoint file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job end to end on a generated corpus, on this machine")
    p.add_argument("--run-dir", default=None, help="default: runs/demo")
    p.add_argument("--num-images", type=int, default=None, help="URL-list rows, junk included (default 480)")
    p.add_argument("--base-steps", type=int, default=None, help="base stage optimiser steps (default 600)")
    p.add_argument("--sr-steps", type=int, default=None, help="super-resolution stage steps (default 400)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(run=_demo)

    data = sub.add_parser("data", help="dataset steps").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("ingest", help="download a URL list with img2dataset into shards")
    p.add_argument("--urls", nargs="+", required=True, help="URL list files or folders (parquet/csv/tsv/jsonl)")
    p.add_argument("--url-column", default="url")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=10_000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--allow-loopback", action="store_true", help="allow 127.0.0.0/8 URLs (local test servers)")
    _add_ray(p)
    p.set_defaults(run=_ingest)

    p = data.add_parser("curate", help="CLIP score and filter an ingested dataset")
    p.add_argument("--ingest", required=True)
    p.add_argument("--out", required=True)
    _add_clip(p)
    _add_ray(p)
    p.set_defaults(run=_curate)

    p = data.add_parser("embed", help="text embeddings of curated captions into Parquet")
    p.add_argument("--curate", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--encoder", default="google/t5-v1_1-xxl", help="HF name or local directory")
    p.add_argument("--encoder-kind", default="t5", choices=["t5", "open_clip"])
    _add_ray(p)
    p.set_defaults(run=_embed)

    p = data.add_parser("search", help="nearest curated images to a text query")
    p.add_argument("query")
    p.add_argument("--data", required=True, help="curate (or embed) directory")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default=None, help="contact sheet PNG (default: <data>/search/<query>.png)")
    _add_clip(p)
    p.set_defaults(run=_search)

    p = data.add_parser("report", help="funnel, CLIP-score histogram and example grids of a curate run")
    p.add_argument("--curate", required=True)
    p.add_argument("--ingest", default=None)
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(run=_report)

    p = sub.add_parser("train", help="train one cascade stage with DeepSpeed on Ray Train")
    p.add_argument("--config", required=True,
                   help="TrainConfig as TOML or JSON; cluster/train/ has one per paper stage (README, config reference)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set data.paths='[\"s3://b/embed/shards\"]' "
                        "--set scaling.num_workers=64 (TOML values; repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the stored run from its latest checkpoint")
    _add_ray(p)
    p.set_defaults(run=_train)

    reg = sub.add_parser("registry", help="MLflow model registry").add_subparsers(dest="registry_command", required=True)
    p = reg.add_parser("register", help="register an exported stage checkpoint as <name>-<stage>, alias challenger")
    p.add_argument("checkpoint")
    p.add_argument("--run-id", default=None, help="the stage's training run (for provenance tags)")
    _add_registry(p)
    p.set_defaults(run=_register)
    p = reg.add_parser("promote", help="move champion to the challenger if it wins on the metric")
    p.add_argument("--stage", required=True)
    p.add_argument("--metric", default="val_loss")
    p.add_argument("--direction", choices=["min", "max"], default="min")
    p.add_argument("--min-abs", type=float, default=0.0, help="minimum absolute improvement")
    p.add_argument("--min-rel", type=float, default=0.0, help="minimum relative improvement")
    p.add_argument("--force", action="store_true")
    p.add_argument("--reason", default=None, help="why (required with --force)")
    _add_registry(p)
    p.set_defaults(run=_promote)
    p = reg.add_parser("rollback", help="restore the previous champion")
    p.add_argument("--stage", default=None, help="a stage; none: the cascade model")
    p.add_argument("--reason", default=None)
    _add_registry(p)
    p.set_defaults(run=_rollback)
    p = reg.add_parser("list", help="stages, versions, aliases and metrics")
    _add_registry(p)
    p.set_defaults(run=_list)

    p = sub.add_parser("sample", help="sample prompts from the registered cascade or local checkpoints")
    p.add_argument("prompts", nargs="+")
    p.add_argument("-o", "--output", default="sample.png")
    _add_sampling(p)
    p.set_defaults(run=_sample)
    p = sub.add_parser("upscale", help="upscale an image with a super-resolution stage alone")
    p.add_argument("image")
    p.add_argument("--prompt", default="")
    p.add_argument("-o", "--output", default="upscaled.png")
    _add_sampling(p)
    p.set_defaults(run=_upscale)
    p = sub.add_parser("edit", help="inpaint the white region of --mask (RePaint with the base stage)")
    p.add_argument("image")
    p.add_argument("prompt")
    p.add_argument("--mask", required=True)
    p.add_argument("-o", "--output", default="edited.png")
    _add_sampling(p)
    p.set_defaults(run=_edit)
    return parser


def _add_registry(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="imagen", help="registered model name (stages are <name>-<stage>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registry URI, e.g. models:/imagen@champion or models:/imagen-sr1/3")
    p.add_argument("--checkpoint", nargs="+", default=None, help="local exported stage checkpoint directories")
    p.add_argument("--sampler", choices=["ancestral", "ddim", "dpmpp_2m"], default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--safety-clip", default=None, help="open_clip model (or local-dir:<folder>) for the output check")
    p.add_argument("--safety-clip-pretrained", default=None)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "demo" else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        result = args.run(args)
    except Exception as exc:  # noqa: BLE001 - only the errors below are the user's to fix; others re-raise
        if type(exc).__name__ not in USER_ERRORS:
            raise
        print(f"imagen: error: {exc}", file=sys.stderr)
        return 2
    if args.command != "demo":
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
