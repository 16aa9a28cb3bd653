"""Curation report: the funnel, the CLIP-score histogram and example grids, next to the data.

Writes `<curate_dir>/report/`: report.json (funnel with counts and reasons per filter, score
statistics), clip_score_hist.png, kept.png and one rejected_<filter>.png per filter that removed
rows. When an MLflow tracking URI is configured (argument or MLFLOW_TRACKING_URI), the same files
go to MLflow: into the active run, or a new run in `experiment`.
"""
from __future__ import annotations

import io
import os
import pathlib
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from pipelines import storage
from pipelines.ann_index import read_parquet
from pipelines.curate import FILTER_ORDER, KEEP, read_decisions
from pipelines.step import finished_manifest, shard_ids_of, shard_path
from pipelines.step import atomic_write_bytes, atomic_write_json
from pipelines.storage import StoragePath

Where = str | os.PathLike | StoragePath


# -- drawing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    image: bytes | None
    """Encoded image, or None (not downloaded): drawn as a grey placeholder."""
    lines: tuple[str, ...]
    """Text under the image (wrapped and cut to fit)."""


def contact_sheet(cells: Sequence[Cell], *, cell_px: int = 96, cols: int = 8, text_lines: int = 4,
                  title: str = "") -> Image.Image:
    """A grid of images with a few lines of text under each."""
    font = ImageFont.load_default()
    line_h, chars = 11, max(8, cell_px // 6)
    title_h = 16 if title else 0
    cell_h = cell_px + text_lines * line_h + 6
    rows = max(1, -(-len(cells) // cols))
    sheet = Image.new("RGB", (cols * (cell_px + 4) + 4, title_h + rows * cell_h + 4), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title[: cols * chars], fill="black", font=font)
    for n, cell in enumerate(cells):
        x, y = 4 + (n % cols) * (cell_px + 4), title_h + 4 + (n // cols) * cell_h
        sheet.paste(_thumbnail(cell.image, cell_px), (x, y))
        wrapped = [w for line in cell.lines for w in textwrap.wrap(line, chars) or [""]][:text_lines]
        for i, text in enumerate(wrapped):
            draw.text((x, y + cell_px + 2 + i * line_h), text, fill="black", font=font)
    return sheet


def _thumbnail(data: bytes | None, size: int) -> Image.Image:
    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
        except Exception:  # noqa: BLE001 - an undecodable image is drawn as a placeholder
            pass
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    ImageDraw.Draw(tile).text((4, size // 2 - 6), "no image" if data is None else "undecodable", fill="black")
    return tile


def save_png(image: Image.Image, path: Where) -> StoragePath:
    """The image as a PNG at `path` (a local path or an object-store URL), written whole."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = storage.path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def score_histogram(kept: np.ndarray, rejected: np.ndarray, path: Where,
                    threshold: float | None) -> StoragePath:
    """Histogram of CLIP image-caption cosine, kept vs rejected (matplotlib, a dependency of mlflow)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - mlflow requires matplotlib
        raise ImportError("the curation report draws its histogram with matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.linspace(-1, 1, 41)
    ax.hist([kept, rejected], bins=bins, stacked=True, label=[f"kept ({len(kept)})", f"rejected ({len(rejected)})"],
            color=["tab:green", "tab:red"])
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("CLIP cosine(image, caption)")
    ax.set_ylabel("rows")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path = storage.path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


# -- the report -----------------------------------------------------------------------------------
def _images_by_key(ingest_dir: StoragePath, shard_ids: Sequence[str], keys: set[str]) -> dict[str, bytes | None]:
    """Image bytes of `keys`, reading only the ingest shards' key and image columns."""
    found: dict[str, bytes | None] = {}
    for shard_id in shard_ids:
        table = read_parquet(shard_path(ingest_dir, shard_id), columns=["key", "image"])
        table = table.filter(pc.is_in(table["key"], value_set=pa.array(sorted(keys), pa.string())))
        found.update(zip(table["key"].to_pylist(), table["image"].to_pylist()))
    return found


def _examples(decisions: Any, examples: int) -> dict[str, Any]:
    """Up to `examples` rows per outcome, first by key: deterministic grids."""
    groups = {"kept": decisions[decisions["decision"] == KEEP].head(examples)}
    for name in FILTER_ORDER:
        rows = decisions[decisions["filter"] == name]
        if len(rows):
            groups[f"rejected_{name}"] = rows.head(examples)
    return groups


def _cell(row: Any, image: bytes | None) -> Cell:
    score = "" if row.clip_score is None or np.isnan(row.clip_score) else f"clip {row.clip_score:.2f} "
    lines = [f"{row.key} {score}".strip()]
    if row.decision != KEEP:
        lines.append(f"{row.reason}: {row.detail or ''}")
    lines.append(row.caption or "")
    return Cell(image, tuple(lines))


def report(curate_dir: Where, *, ingest_dir: Where | None = None, examples: int = 16,
           tracking_uri: str | None = None, experiment: str = "curation") -> dict[str, Any]:
    """Write the report next to the curated data (a local folder or an object-store prefix); log it to
    MLflow when a tracking URI is set."""
    curate_dir = storage.path(curate_dir)
    manifest = finished_manifest(curate_dir, "curate")
    ingest_dir = storage.path(ingest_dir or manifest["ingest_dir"])
    out = curate_dir / "report"
    decisions = read_decisions(curate_dir).to_pandas().sort_values("key", kind="stable")
    scores = decisions["clip_score"].astype(float)
    kept_mask = (decisions["decision"] == KEEP).to_numpy()
    clip_cfg = manifest["config"]["clip_score"]
    threshold = clip_cfg["min_score"] if clip_cfg["mode"] == "absolute" else _percentile_cutoff(decisions)
    files = [score_histogram(scores[kept_mask].dropna().to_numpy(), scores[~kept_mask].dropna().to_numpy(),
                             out / "clip_score_hist.png", threshold)]
    groups = _examples(decisions, examples)
    images = _images_by_key(ingest_dir, shard_ids_of(manifest), {k for g in groups.values() for k in g["key"]})
    for name, rows in groups.items():
        cells = [_cell(row, images.get(row.key)) for row in rows.itertuples(index=False)]
        files.append(save_png(contact_sheet(cells, title=f"{name}: first {len(cells)} by key"), out / f"{name}.png"))
    summary = {
        "funnel": manifest["funnel"],
        "clip_score": _score_stats(scores, kept_mask),
        "clip_score_mode": clip_cfg["mode"],
        "clip_score_threshold": threshold,
        "files": [f.name for f in files],
    }
    atomic_write_json(out / "report.json", summary)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        summary["mlflow_run_id"] = log_to_mlflow(summary, out, uri, experiment)
    return summary


def _percentile_cutoff(decisions: Any) -> float | None:
    """The lowest kept score in percentile mode (the global cutoff that was applied)."""
    kept = decisions[decisions["decision"] == KEEP]["clip_score"]
    return float(kept.min()) if len(kept) else None


def _score_stats(scores: Any, kept_mask: np.ndarray) -> dict[str, Any]:
    def stats(values: Any) -> dict[str, float]:
        values = values.dropna()
        if not len(values):
            return {"n": 0}
        q = np.percentile(values, [5, 50, 95])
        return {"n": int(len(values)), "mean": float(values.mean()),
                "p5": float(q[0]), "p50": float(q[1]), "p95": float(q[2])}

    return {"kept": stats(scores[kept_mask]), "rejected": stats(scores[~kept_mask])}


def log_to_mlflow(summary: dict[str, Any], report_dir: Where, tracking_uri: str, experiment: str) -> str:
    """report.json + PNGs as artifacts under curation/, funnel counts as metrics; returns the run id.

    Logs into the active run when there is one (a pipeline run that curates then trains), else
    into a new run of `experiment` at `tracking_uri`.
    """
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        _log_report(mlflow, summary, report_dir)
        return active.info.run_id
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        _log_report(mlflow, summary, report_dir)
        return run.info.run_id


def _log_report(mlflow: Any, summary: dict[str, Any], report_dir: Where) -> None:
    mlflow.log_dict(summary, "curation/report.json")
    report_dir = storage.path(report_dir)
    if report_dir.is_local:
        mlflow.log_artifacts(str(report_dir), "curation")
    else:  # mlflow uploads from a local folder
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifacts(str(report_dir.download_to(pathlib.Path(tmp))), "curation")
    funnel = summary["funnel"]
    metrics = {"curation_input": funnel["input"], "curation_downloaded": funnel["downloaded"],
               "curation_kept": funnel["kept"]}
    metrics.update({f"curation_removed_{s['filter']}": s["removed"] for s in funnel["stages"]})
    mlflow.log_metrics(metrics)
