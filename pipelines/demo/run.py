"""`imagen demo`: `imagen run` of the shipped demo config, with what only the demo needs made first.

Before the run: the captioned-shapes corpus is written and served on 127.0.0.1 (its URL list becomes
`ingest.url_list.paths`), and a tiny CLIP is fitted on separately generated scenes (offline there are no
pretrained weights): it scores curation (`curate.score.clip`) and its text tower is the frozen text encoder
(`embed.text_encoder`). Prompts no training row has become `evaluate.prompts`. After the run: the champion
cascade, loaded back by alias, draws those prompts into `samples.png`, with the colour checks in `samples.json`.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
import random
import time
from collections.abc import Sequence
from typing import Any

from imagen_core.config_io import ConfigError, apply_override, build, load_file
from pipelines import storage
from pipelines.pipeline_config import local_dir

DEMO_CONFIG = "demo.toml"


@dataclasses.dataclass(kw_only=True, frozen=True)
class DemoOptions:
    """The `[demo]` table: what only the demo makes (everything else is the pipeline config)."""

    num_images: int = 4000
    """Rows of the generated URL list, junk included (about 60% are kept). The prompts are unseen combinations of
    colours, shapes and cells, so the base stage must generalise: at 480 rows (about 300 kept) its 600 steps saw
    each training image 60 times; at 4000 about 8 times, for 40 s more of ingest, curation and embedding."""
    port: int = 0
    """Port of the local corpus server; 0 picks a free one on the first run and reuses it on reruns (the URLs,
    and so the ingest step's key, contain it)."""
    num_prompts: int = 16
    """Prompts unseen in training that evaluation and the sample grid use."""

    def __post_init__(self) -> None:
        if self.num_images < 100:
            raise ValueError(f"num_images must be >= 100 so the CLIP fit and both stages have data, got {self.num_images}")


def demo_config_path() -> str:
    """The demo config shipped inside the package (works from any directory)."""
    return str(importlib.resources.files("pipelines") / "configs" / DEMO_CONFIG)


def demo_table(path: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The demo config as plain data with `--set` overrides applied."""
    from pipelines.pipeline_config import apply_overrides

    return apply_overrides(load_file(path or demo_config_path()), overrides)


def demo_select() -> Any:
    """The demo's curation thresholds (tuned for the tiny CLIP), as the shipped config sets them."""
    from pipelines.curate import SelectConfig

    return build(SelectConfig, demo_table()["curate"]["select"], "curate.select")


def _serve_corpus(root: pathlib.Path, options: DemoOptions, seed: int) -> tuple[Any, pathlib.Path]:
    """Write the corpus once and serve it on the port it was written for."""
    from pipelines.demo.corpus import DemoCorpusConfig, serve_directory, write_demo_corpus

    corpus_dir = root / "corpus"
    state = corpus_dir / "served.json"
    port = json.loads(state.read_text())["port"] if state.exists() else options.port
    (corpus_dir / "www").mkdir(parents=True, exist_ok=True)
    try:
        server = serve_directory(corpus_dir / "www", port=port)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve the demo corpus on 127.0.0.1:{port} ({exc}); the corpus in {corpus_dir} was written for "
            "that port. Free it, or use a new run_dir."
        ) from exc
    if not state.exists():
        corpus = DemoCorpusConfig(num_images=options.num_images, seed=seed, image_size=64)
        write_demo_corpus(corpus, corpus_dir, server.base_url)
        state.write_text(json.dumps({"port": int(server.base_url.rsplit(":", 1)[1])}))
    return server, corpus_dir / "urls.parquet"


def fit_demo_clip(root: pathlib.Path, seed: int) -> Any:
    """A tiny CLIP trained on separately generated pairs (other scenes than the corpus, like a model trained
    elsewhere); fitted once per run directory. Returns its ClipConfig."""
    from pipelines.clip_model import CHECKPOINT_FILE, ClipConfig, TinyClipFit, fit_tiny_clip
    from pipelines.demo.corpus import random_scene, render

    folder = root / "clip"
    if not (folder / CHECKPOINT_FILE).is_file():  # written last by the fit
        rng = random.Random(seed + 10_000)
        scenes = [random_scene(rng) for _ in range(1024)]
        fit_tiny_clip([render(s, 64) for s in scenes], [s.caption() for s in scenes], folder, TinyClipFit(seed=seed))
    return ClipConfig.tiny(folder)


def demo_text_encoder(clip: Any) -> dict[str, Any]:
    """The demo's frozen text encoder: the per-token outputs of the fitted CLIP's text tower.

    Imagen's finding is that the frozen text encoder's knowledge drives image-text alignment (Sec 4.4: scaling
    the encoder helps more than scaling the U-Net). Offline there is no pretrained T5; a random-init one knows
    no words, and the base stage then learned colours from it several times slower (measured on the demo
    corpus, 500 steps of 32: background colour right in 0.19 of unseen prompts with the random T5, 0.75 with
    this tower). The CLIP fitted for curation is the offline stand-in for a pretrained encoder.
    """
    return {"kind": "open_clip", "name": clip.model_name, "max_length": 32}


def unseen_prompts(url_list: pathlib.Path, count: int, seed: int) -> list[str]:
    """Captions of the demo's grammar that no row of the corpus (so no training row) has."""
    import pyarrow.parquet as pq

    from pipelines.demo.corpus import random_scene

    seen = set(pq.read_table(url_list, columns=["caption"])["caption"].to_pylist())
    rng, prompts = random.Random(seed + 20_000), []
    while len(prompts) < count:
        caption = random_scene(rng).caption()
        if caption not in seen and caption not in prompts:
            prompts.append(caption)
    return prompts


def sample_grid(config: Any, prompts: list[str]) -> dict[str, Any]:
    """The registered champion cascade, loaded back by alias, sampled for the prompts; the grid and the colour
    checks of its output after the base stage and after the last stage."""
    from pipelines.registry import load_cascade
    from pipelines.demo.colour import background_accuracy, colour_accuracy, position_accuracy
    from pipelines.registry.images import png_bytes
    from pipelines.report import Cell, contact_sheet, save_png
    from pipelines.step import atomic_write_json

    outputs = load_cascade(f"models:/{config.model_name}@champion", tracking_uri=config.mlflow_uri).cascade.sample(
        prompts, seed=config.seed)
    cells = [Cell(image=png_bytes(img), lines=(prompt,)) for img, prompt in zip(outputs[-1], prompts)]
    grid = save_png(contact_sheet(cells, cell_px=128, cols=4), config.root / "samples.png")
    checks: dict[str, Any] = {"grid": str(grid), "prompts": len(prompts)}
    for name, images in (("base", outputs[0]), ("cascade", outputs[-1])):
        checks[f"{name}_colour_accuracy"] = colour_accuracy(images, prompts)[0]
        checks[f"{name}_background_accuracy"] = background_accuracy(images, prompts)[0]
        checks[f"{name}_position_accuracy"] = position_accuracy(images, prompts)[0]
    atomic_write_json(config.root / "samples.json", checks)
    return checks


def _check_before_work(data: dict[str, Any]) -> None:
    """Every field of the demo config, checked before the corpus and the CLIP are made: the paths those give
    are filled with stand-ins here, their real values only exist afterwards."""
    from pipelines.pipeline_config import pipeline_config_from_dict

    stand_ins = {
        "ingest": {**data.get("ingest", {}), "url_list": {"paths": ["corpus/urls.parquet"]}},
        "curate": {**data.get("curate", {}), "score": {"clip": {"model_name": "local-dir:clip"}}},
        "embed": {**data.get("embed", {}), "text_encoder": {"kind": "open_clip", "name": "local-dir:clip"}},
    }
    pipeline_config_from_dict({**data, **stand_ins})


def run_demo(config_path: str | None = None, overrides: Sequence[str] = (), out: Any = None) -> dict[str, Any]:
    """Make the corpus, the CLIP and the prompts, run the pipeline on the demo config, sample the champion."""
    from pipelines.pipeline import run_pipeline
    from pipelines.pipeline_config import pipeline_config_from_dict
    from pipelines.run_output import RunOutput

    data = demo_table(config_path, overrides)
    options = build(DemoOptions, data.pop("demo", {}), "demo")
    if not isinstance(data.get("run_dir"), str):
        raise ConfigError("run_dir: the demo config needs the directory every step writes under")
    root = storage.path(data["run_dir"])
    local = local_dir(root)  # the served corpus and the fitted CLIP: on this machine, whatever run_dir is
    local.mkdir(parents=True, exist_ok=True)
    _check_before_work(data)
    seed = int(data.get("seed", 0))
    out = out or RunOutput(pathlib.Path(data.get("log_file") or local / "run.log"))
    with out.capture():
        server, url_list = _serve_corpus(local, options, seed)
        try:
            out.line(f"demo corpus: {options.num_images} rows served at {server.base_url}")
            clip = fit_demo_clip(local, seed)
            prompts = unseen_prompts(url_list, options.num_prompts, seed)
            data = apply_override(data, f"ingest.url_list.paths={json.dumps([str(url_list)])}")
            data["curate"] = {**data.get("curate", {}), "score": {**data.get("curate", {}).get("score", {}),
                                                                   "clip": {"model_name": clip.model_name}}}
            data["embed"] = {**data.get("embed", {}), "text_encoder": demo_text_encoder(clip)}
            data["evaluate"] = {**data.get("evaluate", {}), "prompts": prompts}
            config = pipeline_config_from_dict(data)
            summary = run_pipeline(config, out)
        finally:
            server.stop()
        out.start("sample")
        started = time.monotonic()
        samples = sample_grid(config, prompts)
        out.done("sample", time.monotonic() - started, samples["grid"])
    summary.update(samples=samples, prompts=prompts)
    (root / "summary.json").write_json(summary)
    return summary
