"""The `imagen` console script: parse, build the typed config, run, print a summary. No work at import.

Every command configures the same way: `--config FILE` (TOML/JSON) gives its typed config, the command's flags
are shorthands for fields of it, and repeatable `--set dotted.key=value` overrides any field; the whole config is
checked before any work, and a bad key, type or choice is named.
"""
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
    "StepKeyMismatch", "RunExists", "TrackingUnavailable", "FileNotFoundError", "InceptionUnavailable", "StorageError",
})


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command-line shorthand for one field of the command's config."""

    flags: tuple[str, ...]
    field: str
    """The dotted field it sets."""
    help: str = ""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def _print(result: Any) -> None:
    """The command's result as JSON on stdout (a dataclass result as its fields)."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    print(json.dumps(result, indent=2, default=str))


def _data(args: argparse.Namespace, with_sets: bool = True) -> dict[str, Any]:
    """The command's config as plain data: the file, then the flags given, then every `--set`."""
    from imagen_core.config_io import apply_override, load_file, set_field

    data = load_file(args.config) if args.config else {}
    for flag in args.shorthands:
        value = getattr(args, flag.field.replace(".", "__"))
        if value is not None:
            data = set_field(data, flag.field, list(value) if isinstance(value, tuple) else value)
    for assignment in args.set if with_sets else ():
        data = apply_override(data, assignment)
    return data


def _config(cls: type, args: argparse.Namespace) -> Any:
    from imagen_core.config_io import build

    return build(cls, _data(args))


# -- the pipeline -------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> Any:
    from pipelines.pipeline import run_pipeline
    from pipelines.pipeline_config import pipeline_config_from_dict

    from imagen_core.config_io import load_file

    summary = run_pipeline(pipeline_config_from_dict(load_file(args.config), args.set))
    _print_where_to_look(summary)
    return None


def _demo(args: argparse.Namespace) -> Any:
    from pipelines.demo.run import demo_config_path, run_demo

    overrides = [*([f"run_dir={json.dumps(args.run_dir)}"] if args.run_dir else []), *args.set]
    summary = run_demo(args.config or demo_config_path(), overrides)
    samples = summary["samples"]
    print(f"\nsamples for prompts unseen in training: {samples['grid']}\n"
          f"background colour right in {samples['cascade_background_accuracy']:.2f} of them, every named colour "
          f"shown in {samples['cascade_colour_accuracy']:.2f} (chance: about 1/13 for the background), each shape in "
          f"its named cell in {samples['cascade_position_accuracy']:.2f}")
    for shard in summary["evaluate"]["shards"]:
        metrics = shard["metrics"]
        if "psnr" in metrics:
            print(f"{shard['shard_id']} on held-out images: PSNR {metrics['psnr']:.1f} dB against the ground truth, "
                  f"bicubic upsampling {metrics['psnr_bicubic']:.1f} dB")
    _print_where_to_look(summary)
    return None


def _print_where_to_look(summary: dict[str, Any]) -> None:
    curate_report = os.path.join(summary["run_dir"], "curate", "report", "report.json")
    print(f"funnel report: {curate_report}\n"
          f"MLflow: run {summary['mlflow_run_id']} (a nested run per step); "
          f"mlflow ui --backend-store-uri {summary['mlflow']}\n"
          f"champion cascade: {summary['model_uri']}\n"
          f"log file: {summary['log_file']}; imagen status {summary['run_dir']}")


def _plan(args: argparse.Namespace) -> Any:
    from pipelines.plan import PlanCommand, format_plan, plan

    c = _config(PlanCommand, args)
    print(format_plan(c, *plan(c)))
    return None


def _status(args: argparse.Namespace) -> Any:
    from pipelines.status import format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2, default=str) if args.json else format_status(status))
    return None


# -- data ---------------------------------------------------------------------------------------------------
def _ingest(args: argparse.Namespace) -> Any:
    from pipelines.commands import IngestCommand
    from pipelines.ingest import run_ingest
    from pipelines.url_lists import validate_url_list

    command = _config(IngestCommand, args)
    validate_url_list(command.ingest.url_list)  # seconds, before Ray starts: a bad list fails here
    return run_ingest(command.ingest, command.ray)


def _curate(args: argparse.Namespace) -> Any:
    from pipelines.commands import CurateCommand
    from pipelines.curate import curate
    from pipelines.ray_env import init_ray

    command = _config(CurateCommand, args)
    init_ray(command.ray)
    return curate(command.ingest_dir, command.output_dir, command.curate)


def _embed(args: argparse.Namespace) -> Any:
    from pipelines.commands import EmbedCommand
    from pipelines.embed import embed
    from pipelines.ray_env import init_ray

    command = _config(EmbedCommand, args)
    init_ray(command.ray)
    return embed(command.curate_dir, command.output_dir, command.embed)


def _search(args: argparse.Namespace) -> Any:
    from pipelines.commands import SearchCommand
    from pipelines.search import search

    command = _config(SearchCommand, args)
    return search(command.data_dir, command.query, clip=command.clip, k=command.k, out_png=command.out_png)


def _report(args: argparse.Namespace) -> Any:
    from pipelines.commands import ReportCommand
    from pipelines.report import report

    c = _config(ReportCommand, args)
    return report(c.curate_dir, ingest_dir=c.ingest_dir, examples=c.examples, tracking_uri=c.tracking_uri,
                  experiment=c.experiment)


# -- train --------------------------------------------------------------------------------------------------
def _train(args: argparse.Namespace) -> Any:
    from pipelines.ray_env import RayConfig
    from pipelines.train.config import TrainConfig
    from pipelines.train.trainer import train_stage

    # `stage` may name a recipe: from_dict resolves it before the overrides, so they can change its fields
    config = TrainConfig.from_dict(_data(args, with_sets=False), args.set)
    return train_stage(config, RayConfig(address=args.ray_address, num_cpus=args.num_cpus))


# -- registry and sampling ---------------------------------------------------------------------------------
def _tracking(uri: str | None) -> None:
    """Check the tracking server in seconds, before anything loads (unreachable -> a clear error)."""
    from pipelines.tracking import configure_tracking

    configure_tracking(uri)


def _register(args: argparse.Namespace) -> Any:
    from pipelines.commands import RegisterCommand
    from pipelines.registry import register_stage

    c = _config(RegisterCommand, args)
    _tracking(c.tracking_uri)
    return {"model": c.name, "version": register_stage(c.checkpoint, c.name, c.register)}


def _evaluate(args: argparse.Namespace) -> Any:
    from pipelines.commands import EvaluateCommand
    from pipelines.registry.evaluate import evaluate_stage

    c = _config(EvaluateCommand, args)
    _tracking(c.tracking_uri)
    result = evaluate_stage(c.name, c.stage, version=c.version, config=c.evaluate)
    return {"metrics": result.metrics, "notes": result.notes}


def _register_cascade(args: argparse.Namespace) -> Any:
    from pipelines.commands import RegisterCascadeCommand
    from pipelines.registry.register import register_cascade

    c = _config(RegisterCascadeCommand, args)
    _tracking(c.tracking_uri)
    return {"model": c.name, "version": register_cascade(c.name, c.cascade, c.register),
            "uri": f"models:/{c.name}@champion"}


def _promote(args: argparse.Namespace) -> Any:
    from pipelines.commands import PromoteCommand
    from pipelines.registry.metrics import MetricSpec
    from pipelines.registry.promote import promote

    c = _config(PromoteCommand, args)
    _tracking(c.tracking_uri)
    metric = MetricSpec(c.metric, direction=c.direction) if c.direction else c.metric
    return promote(c.name, c.stage, metric, min_abs=c.min_abs, min_rel=c.min_rel, force=c.force,
                   reason=c.reason).summary()


def _rollback(args: argparse.Namespace) -> Any:
    from pipelines.commands import RollbackCommand
    from pipelines.registry import rollback

    c = _config(RollbackCommand, args)
    _tracking(c.tracking_uri)
    return rollback(c.name, c.stage, reason=c.reason)


def _list(args: argparse.Namespace) -> Any:
    from pipelines.commands import RegistryCommand
    from pipelines.registry import list_stages

    c = _config(RegistryCommand, args)
    _tracking(c.tracking_uri)
    print(list_stages(c.name).to_string(index=False))


def _source(c: Any) -> Any:
    if c.model:
        _tracking(c.tracking_uri)
        return c.model
    return list(c.checkpoint)


def _progress() -> Any:
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, step: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=f"sampling {stage}", unit="step"))
        bar.update(1)
        if step + 1 >= total:
            bar.close()

    return update


def _safety(c: Any) -> Any:
    """The output safety check, with the CLIP that curation used (none given: no check, said aloud)."""
    if c.safety_clip is None:
        print("note: no safety_clip given (--safety-clip), so outputs are not screened for unsafe content",
              file=sys.stderr)
        return None
    from pipelines.registry import SafetyChecker, SafetyConfig

    return SafetyChecker(SafetyConfig(clip=c.safety_clip))


def _report_outputs(outputs: Any) -> Any:
    for out in outputs:
        print(f"withheld ({out.withheld}): {out.prompt}" if out.withheld else f"wrote {out.path}")
    return None


def _sample(args: argparse.Namespace) -> Any:
    from pipelines.commands import SampleCommand
    from pipelines.registry import sample_images
    from pipelines.registry.images import write_png

    c = _config(SampleCommand, args)
    outputs = sample_images(_source(c), list(c.prompts), c.sample, safety=_safety(c), progress=_progress())
    for i, out in enumerate(outputs):
        if out.image is not None:
            path = c.output if len(outputs) == 1 else f"{c.output.removesuffix('.png')}_{i}.png"
            out.path = write_png(out.image, path)
    return _report_outputs(outputs)


def _upscale(args: argparse.Namespace) -> Any:
    from pipelines.commands import UpscaleCommand
    from pipelines.registry import upscale

    c = _config(UpscaleCommand, args)
    out = upscale(_source(c), c.image, c.output, prompt=c.prompt, config=c.sample, safety=_safety(c),
                  progress=_progress())
    return _report_outputs([out])


def _edit(args: argparse.Namespace) -> Any:
    from pipelines.commands import EditCommand
    from pipelines.registry import edit

    c = _config(EditCommand, args)
    config = dataclasses.replace(c.edit, sample=c.sample)
    out = edit(_source(c), c.image, c.mask, c.prompt, c.output, config=config, safety=_safety(c), progress=_progress())
    return _report_outputs([out])


# -- the parser ---------------------------------------------------------------------------------------------
RAY = (Flag(("--ray-address",), "ray.address", "Ray cluster address ('auto' on a cluster node); default: local Ray"),
       Flag(("--num-cpus",), "ray.num_cpus", "CPUs of a local Ray (default: all)", {"type": int}))
REGISTRY = (Flag(("--name",), "name", "registered model name (stages are <name>-<stage>; default imagen)"),
            Flag(("--tracking-uri",), "tracking_uri", "MLflow tracking URI (default: MLFLOW_TRACKING_URI)"))
SAMPLING = (
    Flag(("--model",), "model", "registry URI, e.g. models:/imagen@champion or models:/imagen-sr1/3"),
    Flag(("--checkpoint",), "checkpoint", "local exported stage checkpoint directories", {"nargs": "+"}),
    Flag(("--sampler",), "sample.sampler", "sampler kind", {"choices": ["ancestral", "ddim", "dpmpp_2m"]}),
    Flag(("--steps",), "sample.steps", "sampler steps", {"type": int}),
    Flag(("--guidance",), "sample.guidance", "classifier-free guidance scale", {"type": float}),
    Flag(("--seed",), "sample.seed", "seed of all noise", {"type": int}),
    Flag(("--device",), "sample.device", "torch device"),
    Flag(("--tracking-uri",), "tracking_uri", "MLflow tracking URI"),
    Flag(("--safety-clip",), "safety_clip.model_name", "open_clip model (or local-dir:<folder>) for the output check"),
    Flag(("--safety-clip-pretrained",), "safety_clip.pretrained", "its pretrained tag or checkpoint file"),
)


def _command(sub: Any, name: str, run: Command, help: str, config_help: str, flags: Sequence[Flag] = (),
             positionals: Sequence[Flag] = ()) -> argparse.ArgumentParser:
    """A subcommand with --config/--set and its shorthand flags (each documented with the field it sets)."""
    p = sub.add_parser(name, help=help, description=f"{help}. Config: {config_help}.")
    for flag in positionals:
        p.add_argument(flag.field.replace(".", "__"), metavar=flag.flags[0], help=f"{flag.help} (field {flag.field})",
                       **flag.kwargs)
    p.add_argument("--config", default=None, help=f"config file (TOML/JSON): {config_help}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set a.b=3 (a TOML value; repeatable)")
    for flag in flags:
        p.add_argument(*flag.flags, dest=flag.field.replace(".", "__"), default=None,
                       help=f"{flag.help} (field {flag.field})", **flag.kwargs)
    p.set_defaults(run=run, shorthands=(*positionals, *flags))
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagen", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="the whole pipeline from one config: URL list to a promoted cascade (resumable)")
    p.add_argument("config", help="pipeline config (TOML): run_dir, [ray], [ingest], [curate], [embed], "
                                  "[train.<stage>], [evaluate], [register], [promote]")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field (repeatable)")
    p.set_defaults(run=_run, shorthands=())
    p = sub.add_parser("demo", help="the main job end to end: `imagen run` of the shipped demo config on a "
                                    "generated corpus served on 127.0.0.1")
    p.add_argument("--config", default=None, help="a demo config (default: the shipped pipelines/configs/demo.toml)")
    p.add_argument("--run-dir", default=None, help="shorthand for --set run_dir=... (default runs/demo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set train.base.total_steps=1000 (repeatable)")
    p.set_defaults(run=_demo, shorthands=())
    p = sub.add_parser("status", help="each step of a run directory: done / running / pending / failed")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="the full state as JSON")
    p.set_defaults(run=_status, shorthands=())

    _command(sub, "plan", _plan, "nodes x days, TB and dollars of a run, from the measured and stated unit costs",
             "pairs, stages, steps, global_batch, keep_fraction, mfu, download_nodes, gpus, [prices], unit_costs", (
                 Flag(("--pairs",), "pairs", "pairs in the URL list (400M, 5B)"),
                 Flag(("--stages",), "stages", "cascade recipe (paper, demo, tiny)"),
                 Flag(("--steps",), "steps", "training steps per stage", {"type": int}),
                 Flag(("--gpus",), "gpus", "GPUs of the cluster", {"type": int}),
                 Flag(("--mfu",), "mfu", "model FLOPs utilisation of training", {"type": float})))
    data = sub.add_parser("data", help="dataset steps").add_subparsers(dest="data_command", required=True)
    _command(data, "ingest", _ingest, "download a URL list with img2dataset into shards", "[ingest] (IngestConfig), [ray]", (
        Flag(("--urls",), "ingest.url_list.paths", "URL list files or folders (parquet/csv/tsv/jsonl)", {"nargs": "+"}),
        Flag(("--url-column",), "ingest.url_list.url_column", "URL column"),
        Flag(("--caption-column",), "ingest.url_list.caption_column", "caption column"),
        Flag(("--out",), "ingest.output_dir", "the step directory"),
        Flag(("--rows-per-shard",), "ingest.rows_per_shard", "rows per shard", {"type": int}),
        Flag(("--image-size",), "ingest.image_size", "side of the stored images", {"type": int}),
        Flag(("--allow-loopback",), "ingest.policy.allow_loopback", "allow 127.0.0.0/8 URLs (local test servers)",
             {"action": "store_const", "const": True}),
        *RAY))
    clip = (Flag(("--clip-model",), "curate.score.clip.model_name", "open_clip architecture or local-dir:<folder>"),
            Flag(("--clip-pretrained",), "curate.score.clip.pretrained", "open_clip pretrained tag or checkpoint"))
    _command(data, "curate", _curate, "CLIP score and filter an ingested dataset",
             "ingest_dir, output_dir, [curate] (score, select, pool), [ray]", (
                 Flag(("--ingest",), "ingest_dir", "a finished ingest directory"),
                 Flag(("--out",), "output_dir", "the curation directory"), *clip,
                 Flag(("--device",), "curate.score.clip.device", "torch device of the CLIP"),
                 Flag(("--pool-size",), "curate.pool.size", "scoring actors", {"type": int}),
                 Flag(("--gpus-per-actor",), "curate.pool.num_gpus", "GPUs per actor (fractions allowed)", {"type": float}),
                 *RAY))
    _command(data, "embed", _embed, "text embeddings of curated captions into Parquet",
             "curate_dir, output_dir, [embed] (text_encoder, device, pool), [ray]", (
                 Flag(("--curate",), "curate_dir", "a finished curation directory"),
                 Flag(("--out",), "output_dir", "the embed directory"),
                 Flag(("--encoder",), "embed.text_encoder.name", "HF name or local directory (e.g. google/t5-v1_1-xxl)"),
                 Flag(("--encoder-kind",), "embed.text_encoder.kind", "t5 or open_clip", {"choices": ["t5", "open_clip"]}),
                 Flag(("--device",), "embed.device", "torch device of the encoder"),
                 Flag(("--batch-size",), "embed.text_encoder.batch_size", "captions per forward pass", {"type": int}),
                 Flag(("--pool-size",), "embed.pool.size", "encoder actors", {"type": int}),
                 Flag(("--gpus-per-actor",), "embed.pool.num_gpus", "GPUs per actor (fractions allowed)", {"type": float}),
                 *RAY))
    _command(data, "search", _search, "nearest curated images to a text query", "data_dir, query, k, clip, out_png", (
        Flag(("--data",), "data_dir", "curate (or embed) directory"),
        Flag(("--k",), "k", "results", {"type": int}),
        Flag(("--out",), "out_png", "contact sheet PNG (default: <data>/search/<query>.png)"),
        Flag(("--clip-model",), "clip.model_name", "open_clip architecture or local-dir:<folder>"),
        Flag(("--clip-pretrained",), "clip.pretrained", "open_clip pretrained tag or checkpoint")),
        positionals=(Flag(("query",), "query", "the text query"),))
    _command(data, "report", _report, "funnel, CLIP-score histogram and example grids of a curation",
             "curate_dir, ingest_dir, examples, tracking_uri", (
                 Flag(("--curate",), "curate_dir", "a finished curation directory"),
                 Flag(("--ingest",), "ingest_dir", "its ingest directory"),
                 Flag(("--tracking-uri",), "tracking_uri", "log the report to MLflow")))

    p = _command(sub, "train", _train, "train one cascade stage with DeepSpeed on Ray Train",
                 "a TrainConfig; cluster/train/ has one per paper stage (README, config reference)", (
                     Flag(("--resume",), "resume", "continue the stored run from its latest checkpoint",
                          {"action": "store_const", "const": True}),))
    p.add_argument("--ray-address", default=None, help="Ray cluster address ('auto' on a cluster node)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")

    reg = sub.add_parser("registry", help="MLflow model registry").add_subparsers(dest="registry_command", required=True)
    _command(reg, "register", _register, "register an exported stage checkpoint as <name>-<stage>, alias challenger",
             "checkpoint, name, tracking_uri, [register]", (
                 Flag(("--run-id",), "register.training_run_id", "the stage's training run (provenance)"), *REGISTRY),
             positionals=(Flag(("checkpoint",), "checkpoint", "exported stage directory"),))
    _command(reg, "evaluate", _evaluate, "evaluate a registered stage version (tags metric.<name> on it)",
             "name, stage, version, tracking_uri, [evaluate] (metrics, heldout_dir, prompts, clip, ...)", (
                 Flag(("--stage",), "stage", "stage name (base, sr1, ...)"),
                 Flag(("--version",), "version", "alias or version number (default challenger)"),
                 Flag(("--heldout",), "evaluate.heldout_dir", "held-out <key>.png + <key>.txt pairs"),
                 Flag(("--metrics",), "evaluate.metrics", "eval_loss clip_score fid psnr colour_accuracy position_accuracy", {"nargs": "+"}),
                 Flag(("--clip-model",), "evaluate.clip.model_name", "open_clip model for clip_score"),
                 Flag(("--clip-pretrained",), "evaluate.clip.pretrained", "its pretrained tag or checkpoint"),
                 *REGISTRY))
    _command(reg, "register-cascade", _register_cascade, "register the cascade <name>, resolving each stage by alias",
             "name, tracking_uri, [cascade] (stages, alias, defaults), [register]", (
                 Flag(("--stages",), "cascade.stages", "stage names, base first", {"nargs": "+"}),
                 Flag(("--alias",), "cascade.alias", "alias each stage resolves by (default champion)"), *REGISTRY))
    _command(reg, "promote", _promote, "move champion to the challenger if it wins on the metric",
             "name, stage, metric, direction, min_abs, min_rel, force, reason, tracking_uri", (
                 Flag(("--stage",), "stage", "stage name"),
                 Flag(("--metric",), "metric", "metric deciding (default eval_loss)"),
                 Flag(("--direction",), "direction", "for other metrics", {"choices": ["min", "max"]}),
                 Flag(("--min-abs",), "min_abs", "minimum absolute improvement", {"type": float}),
                 Flag(("--min-rel",), "min_rel", "minimum relative improvement", {"type": float}),
                 Flag(("--force",), "force", "promote whatever the metric says", {"action": "store_const", "const": True}),
                 Flag(("--reason",), "reason", "why (required with --force)"), *REGISTRY))
    _command(reg, "rollback", _rollback, "restore the previous champion", "name, stage, reason, tracking_uri", (
        Flag(("--stage",), "stage", "a stage; none: the cascade model"),
        Flag(("--reason",), "reason", "why"), *REGISTRY))
    _command(reg, "list", _list, "stages, versions, aliases and metrics", "name, tracking_uri", REGISTRY)

    _command(sub, "sample", _sample, "sample prompts from the registered cascade or local checkpoints",
             "prompts, output, model | checkpoint, [sample], safety_clip",
             (Flag(("-o", "--output"), "output", "PNG path"), *SAMPLING),
             positionals=(Flag(("prompts",), "prompts", "prompts", {"nargs": "*"}),))
    _command(sub, "upscale", _upscale, "upscale an image with a super-resolution stage alone",
             "image, prompt, output, model | checkpoint, [sample]",
             (Flag(("--prompt",), "prompt", "caption of the image"), Flag(("-o", "--output"), "output", "PNG path"),
              *SAMPLING), positionals=(Flag(("image",), "image", "the low-resolution image"),))
    _command(sub, "edit", _edit, "inpaint the white region of --mask (RePaint with the base stage)",
             "image, mask, prompt, output, model | checkpoint, [sample], [edit]",
             (Flag(("--mask",), "mask", "white = regenerate"), Flag(("-o", "--output"), "output", "PNG path"),
              *SAMPLING), positionals=(Flag(("image",), "image", "the image"), Flag(("prompt",), "prompt", "the prompt")))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompts", None) == []:
        args.prompts = None  # none given on the command line: the config file's
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        result = args.run(args)
    except Exception as exc:  # noqa: BLE001 - only the errors below are the user's to fix; others re-raise
        if type(exc).__name__ not in USER_ERRORS:
            raise
        print(f"imagen: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
