"""A deterministic demo corpus: captioned images of coloured shapes, with labelled junk, and a server.

The corpus stands in for a crawled URL list (LAION-style `url`, `caption`) small enough for a laptop:
every image is "a <colour> <shape> <position> on a <colour> background" (one or two shapes), so a
model trained on it can be checked by eye and by attribute. Real lists are full of junk, so a fraction
of rows is junk of a known kind, written to a ground-truth sidecar for the curate step's checks:

| kind | what is served |
|---|---|
| exact_duplicate | the same bytes as another row, under a new URL |
| near_duplicate | another row's image shifted by 1-2 px, resized back and re-encoded as JPEG |
| tiny | an 8x8 image |
| truncated | the first half of a PNG file |
| non_image | HTML or text under an image name (served as image/*) |
| mismatched_caption | a new image with another row's caption |
| missing | nothing: the URL answers 404 |
| empty_caption / url_caption / boilerplate_caption | a new image with "", its own URL, or "click here"-style text |
| opt_out | a new image under `optout/`, served with `X-Robots-Tag: noai` |

`serve_directory` serves the files on 127.0.0.1 with an ephemeral port, counting requests.
"""
from __future__ import annotations

import dataclasses
import functools
import http.server
import io
import math
import pathlib
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "purple": (120, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "cyan": (30, 220, 230),
    "magenta": (230, 30, 200),
    "pink": (250, 170, 200),
    "brown": (125, 75, 35),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "diamond", "cross")
# Centre of each position as a fraction of the image side (a 3x3 grid).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (1 / 6, 1 / 6),
    "top": (1 / 2, 1 / 6),
    "top right": (5 / 6, 1 / 6),
    "left": (1 / 6, 1 / 2),
    "center": (1 / 2, 1 / 2),
    "right": (5 / 6, 1 / 2),
    "bottom left": (1 / 6, 5 / 6),
    "bottom": (1 / 2, 5 / 6),
    "bottom right": (5 / 6, 5 / 6),
}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "center": "in the center"}
JUNK_KINDS = (
    "exact_duplicate",
    "near_duplicate",
    "tiny",
    "truncated",
    "non_image",
    "mismatched_caption",
    "missing",
    "empty_caption",
    "url_caption",
    "boilerplate_caption",
    "opt_out",
)
BOILERPLATE_CAPTIONS = ("image", "Click here to download", "IMG_4032.JPG", "stock photo", "untitled", "Photo by user")
_NON_IMAGES = (
    b"<!doctype html><html><head><title>Not Found</title></head><body>This image was removed.</body></html>\n",
    b"Error 1020: Access denied. The owner of this website has banned your access.\n",
)
TINY_SIZE = 8
OPT_OUT_DIR = "optout"


@dataclass(kw_only=True, frozen=True)
class DemoCorpusConfig:
    num_images: int = 100
    """Rows in the URL list, junk included."""
    seed: int = 0
    """Same seed, same files, captions and order."""
    image_size: int = 64
    """Side of the square images (tiny junk is TINY_SIZE)."""
    image_format: Literal["png", "jpg"] = "png"
    """Encoding of the clean images (near duplicates are always JPEG, truncated files always PNG)."""
    exact_duplicate_fraction: float = 0.05
    """Fraction of rows that are byte-identical copies of a clean row under a new URL."""
    near_duplicate_fraction: float = 0.05
    """Fraction of rows that are shifted, re-encoded copies of a clean row."""
    tiny_fraction: float = 0.03
    """Fraction of rows whose image is 8x8."""
    truncated_fraction: float = 0.03
    """Fraction of rows whose file is cut in half."""
    non_image_fraction: float = 0.03
    """Fraction of rows serving HTML/text under an image name."""
    mismatched_caption_fraction: float = 0.05
    """Fraction of rows whose caption describes another image."""
    missing_fraction: float = 0.03
    """Fraction of rows whose URL answers 404."""
    empty_caption_fraction: float = 0.02
    """Fraction of rows with an empty caption."""
    url_caption_fraction: float = 0.02
    """Fraction of rows whose caption is the image URL."""
    boilerplate_caption_fraction: float = 0.02
    """Fraction of rows with boilerplate captions ("Click here to download")."""
    opt_out_fraction: float = 0.03
    """Fraction of rows served with `X-Robots-Tag: noai`."""

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 for shapes to be drawable, got {self.image_size}")
        for kind in JUNK_KINDS:
            fraction = getattr(self, f"{kind}_fraction")
            if not 0.0 <= fraction < 1.0:
                raise ValueError(f"{kind}_fraction must be in [0, 1), got {fraction}")
        if self.clean_count() < 1:
            raise ValueError(
                f"the junk fractions leave no clean image among {self.num_images} rows "
                f"({self.junk_counts()}); lower them or raise num_images"
            )

    def junk_counts(self) -> dict[str, int]:
        return {kind: round(getattr(self, f"{kind}_fraction") * self.num_images) for kind in JUNK_KINDS}

    def clean_count(self) -> int:
        return self.num_images - sum(self.junk_counts().values())


# -- scenes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        parts = [f"{_article(s.colour)} {s.colour} {s.shape} {position_phrase(s.position)}" for s in self.shapes]
        return f"{' and '.join(parts)} on {_article(self.background)} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def position_phrase(position: str) -> str:
    """How a caption names a position of the 3x3 grid ("at the top left", "on the right")."""
    return _POSITION_PHRASE.get(position, f"at the {position}")


def random_scene(rng: random.Random) -> Scene:
    background = rng.choice(list(COLOURS))
    positions = rng.sample(list(POSITIONS), k=rng.choice((1, 2)))
    foreground = [c for c in COLOURS if c != background]
    shapes = tuple(Shape(rng.choice(SHAPES), rng.choice(foreground), p) for p in positions)
    return Scene(background, shapes)


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx, cy - r), (cx + 0.87 * r, cy + 0.5 * r), (cx - 0.87 * r, cy + 0.5 * r)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if kind == "star":  # five points, inner radius 0.45 r
        return [
            (cx + rad * math.sin(k * math.pi / 5), cy - rad * math.cos(k * math.pi / 5))
            for k, rad in ((k, r if k % 2 == 0 else 0.45 * r) for k in range(10))
        ]
    raise ValueError(f"{kind} is not a polygon")


def _draw_shape(draw: Any, shape: Shape, size: int) -> None:
    fx, fy = POSITIONS[shape.position]
    cx, cy, r = fx * size, fy * size, size / 6 * 0.85
    fill = COLOURS[shape.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, round(0.35 * r)))
    elif shape.shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif shape.shape == "cross":
        t = 0.3 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        draw.polygon(_shape_points(shape.shape, cx, cy, r), fill=fill)


def render(scene: Scene, size: int) -> Any:
    """Draw at 4x and downsample: anti-aliased edges, still deterministic."""
    from PIL import Image, ImageDraw

    big = Image.new("RGB", (4 * size, 4 * size), COLOURS[scene.background])
    draw = ImageDraw.Draw(big)
    for shape in scene.shapes:
        _draw_shape(draw, shape, 4 * size)
    return big.resize((size, size), Image.Resampling.BOX)


def encode(image: Any, fmt: Literal["png", "jpg"]) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- the corpus -----------------------------------------------------------------------------------
@dataclass
class _Row:
    junk: str
    path: str
    data: bytes | None
    caption: str | None  # None: the row's own URL (url_caption)
    scene: Scene | None
    source: "_Row | None" = None
    caption_source: "_Row | None" = None


class _Builder:
    """Makes rows in a fixed order from one seeded RNG, so a config always gives the same corpus."""

    def __init__(self, config: DemoCorpusConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.files = 0
        self.clean: list[_Row] = []

    def _path(self, ext: str, folder: str = "img") -> str:
        self.files += 1
        return f"{folder}/{self.files:06d}.{ext}"

    def _new(self, junk: str, folder: str = "img") -> _Row:
        """A fresh scene, encoded, captioned with its own description."""
        scene = random_scene(self.rng)
        fmt = self.config.image_format
        data = encode(render(scene, self.config.image_size), fmt)
        return _Row(junk, self._path(fmt, folder), data, scene.caption(), scene)

    def clean_row(self) -> _Row:
        row = self._new("clean")
        self.clean.append(row)
        return row

    def _exact_duplicate(self) -> _Row:
        src = self.rng.choice(self.clean)
        ext = src.path.rsplit(".", 1)[1]
        return _Row("exact_duplicate", self._path(ext), src.data, src.caption, src.scene, source=src)

    def _near_duplicate(self) -> _Row:
        src, size = self.rng.choice(self.clean), self.config.image_size
        dx, dy = self.rng.choice((1, 2)), self.rng.choice((1, 2))
        shifted = render(src.scene, size).crop((dx, dy, size, size)).resize((size, size))
        return _Row("near_duplicate", self._path("jpg"), encode(shifted, "jpg"), src.caption, src.scene, source=src)

    def _tiny(self) -> _Row:
        scene = random_scene(self.rng)
        tiny = render(scene, self.config.image_size).resize((TINY_SIZE, TINY_SIZE))
        return _Row("tiny", self._path("png"), encode(tiny, "png"), scene.caption(), scene)

    def _truncated(self) -> _Row:
        scene = random_scene(self.rng)
        data = encode(render(scene, self.config.image_size), "png")
        return _Row("truncated", self._path("png"), data[: len(data) // 2], scene.caption(), scene)

    def _non_image(self) -> _Row:
        ext, body = self.rng.choice(("jpg", "png")), self.rng.choice(_NON_IMAGES)
        return _Row("non_image", self._path(ext), body, random_scene(self.rng).caption(), None)

    def _mismatched_caption(self) -> _Row:
        while True:  # a fresh scene whose caption some clean row does not share (almost always the first)
            row = self._new("mismatched_caption")
            others = [c for c in self.clean if c.caption != row.caption]
            if others:
                row.caption_source = self.rng.choice(others)
                row.caption = row.caption_source.caption
                return row

    def _missing(self) -> _Row:
        scene = random_scene(self.rng)
        return _Row("missing", self._path(self.config.image_format), None, scene.caption(), scene)

    def _empty_caption(self) -> _Row:
        return dataclasses.replace(self._new("empty_caption"), caption="")

    def _url_caption(self) -> _Row:
        return dataclasses.replace(self._new("url_caption"), caption=None)

    def _boilerplate_caption(self) -> _Row:
        return dataclasses.replace(self._new("boilerplate_caption"), caption=self.rng.choice(BOILERPLATE_CAPTIONS))

    def _opt_out(self) -> _Row:
        return self._new("opt_out", folder=OPT_OUT_DIR)

    def rows(self) -> list[_Row]:
        rows = [self.clean_row() for _ in range(self.config.clean_count())]
        for kind, count in self.config.junk_counts().items():
            make = getattr(self, f"_{kind}")  # one method per JUNK_KINDS entry
            rows.extend(make() for _ in range(count))
        self.rng.shuffle(rows)  # junk spread over the list, so over every shard
        return rows


@dataclass(frozen=True)
class DemoCorpusPaths:
    root: pathlib.Path
    """The folder to serve (`serve_directory(root)`); URLs are `<base_url>/<path>`."""
    url_list: pathlib.Path
    """Parquet with `url`, `caption`: what a user would hand to the ingest step."""
    ground_truth: pathlib.Path
    """Parquet, one row per URL-list row in the same order: junk kind, scene attributes, source rows."""




def _ground_truth_table(rows: list[_Row], urls: list[str], captions: list[str]) -> Any:
    import pyarrow as pa

    index = {id(r): i for i, r in enumerate(rows)}
    shape = pa.struct([("shape", pa.string()), ("colour", pa.string()), ("position", pa.string())])
    return pa.table(
        {
            "row": pa.array(range(len(rows)), pa.int64()),
            "url": urls,
            "caption": captions,
            "junk": [r.junk for r in rows],
            "path": [r.path for r in rows],
            "background": [r.scene.background if r.scene else None for r in rows],
            "shapes": pa.array(
                [[dataclasses.asdict(s) for s in r.scene.shapes] if r.scene else None for r in rows],
                pa.list_(shape),
            ),
            "scene_caption": [r.scene.caption() if r.scene else None for r in rows],
            "source_row": pa.array([index[id(r.source)] if r.source else None for r in rows], pa.int64()),
            "caption_source_row": pa.array(
                [index[id(r.caption_source)] if r.caption_source else None for r in rows], pa.int64()
            ),
        }
    )


def write_demo_corpus(config: DemoCorpusConfig, out_dir: str | pathlib.Path, base_url: str) -> DemoCorpusPaths:
    """Write the files to serve under `out_dir/www`, the URL list and the ground truth.

    `base_url` is where `out_dir/www` will be served (e.g. `serve_directory(...).base_url`); only the
    URL list and the url_caption captions depend on it, the served files do not.
    """
    import pyarrow as pa

    from pipelines.step import atomic_write_json, atomic_write_parquet

    out = pathlib.Path(out_dir)
    paths = DemoCorpusPaths(root=out / "www", url_list=out / "urls.parquet", ground_truth=out / "ground_truth.parquet")
    rows = _Builder(config).rows()
    for row in rows:
        if row.data is not None:
            target = paths.root / row.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(row.data)
    urls = [f"{base_url.rstrip('/')}/{r.path}" for r in rows]
    captions = [url if r.caption is None else r.caption for r, url in zip(rows, urls)]
    atomic_write_parquet(paths.ground_truth, _ground_truth_table(rows, urls, captions))
    atomic_write_parquet(paths.url_list, pa.table({"url": urls, "caption": captions}))
    atomic_write_json(out / "demo_corpus.json", {"config": dataclasses.asdict(config), "base_url": base_url})
    return paths


# -- a local server -------------------------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: Any, opt_out_dir: str) -> None:
        super().__init__(address, handler)
        self.opt_out_dir = opt_out_dir
        self.lock = threading.Lock()
        self.requests: list[str] = []

    def record(self, path: str) -> None:
        with self.lock:
            self.requests.append(path)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that gave up (timeout, killed run) while we answered: expected here
        super().handle_error(request, client_address)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files from `directory` (404 when missing); `/redirect?to=URL` answers 302 to URL; any request
    with `?delay=S` waits S seconds first (a slow server); files under the opt-out folder carry
    `X-Robots-Tag: noai`."""

    server: _Server

    def do_GET(self) -> None:
        self.server.record(self.path)
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        if "delay" in query:
            time.sleep(float(query["delay"][0]))
        if parts.path == "/redirect":
            if "to" not in query:
                self.send_error(400, "use /redirect?to=URL")
                return
            self.send_response(302)
            self.send_header("Location", query["to"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def end_headers(self) -> None:
        if urlsplit(self.path).path.startswith(f"/{self.server.opt_out_dir}/"):
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def list_directory(self, path: Any) -> None:
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass  # tests and the demo would drown in access logs


class DemoServer:
    """A threaded HTTP server for one folder on an ephemeral port. Use as a context manager."""

    def __init__(
        self, root: str | pathlib.Path, *, opt_out_dir: str = OPT_OUT_DIR, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        handler = functools.partial(_Handler, directory=str(root))
        self._server = _Server((host, port), handler, opt_out_dir)
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-server", daemon=True)
        self._thread.start()
        self.base_url = f"http://{host}:{self._server.server_address[1]}"
        """`http://127.0.0.1:<port>`: prefix of every served file's URL."""

    @property
    def requests(self) -> list[str]:
        """Paths (with query) of every request received so far, in arrival order."""
        with self._server.lock:
            return list(self._server.requests)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> "DemoServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_directory(
    root: str | pathlib.Path, *, opt_out_dir: str = OPT_OUT_DIR, host: str = "127.0.0.1", port: int = 0
) -> DemoServer:
    """Start serving `root` now; `server.base_url`, `server.requests`, `server.stop()` (or `with`).

    `port=0` picks a free port. The URL list names the port, so a workflow that must resume an ingest
    after a restart serves on the same fixed port (a new port means new URLs, hence a new ingest).
    """
    return DemoServer(root, opt_out_dir=opt_out_dir, host=host, port=port)
