"""Classifier heads over stored CLIP image embeddings: an aesthetic score and an unsafe-content score.

The LAION shape: a small MLP (or one linear layer) on the unit CLIP image embedding, trained once per
CLIP model and reused for every dataset that model embeds (LAION's improved aesthetic predictor is
Linear(768,1024) -> Linear(1024,128) -> Linear(128,64) -> Linear(64,16) -> Linear(16,1) on ViT-L/14
embeddings, dropout between and no activation; the LAION NSFW detector is a small MLP with a sigmoid).
Selection runs the heads on the fp16 embeddings in the score shards, so a new head or threshold never
reruns CLIP.

File format: one `.safetensors` file (never a pickle) holding `layers.<i>.weight` (out, in) and
`layers.<i>.bias` (out,) for the linear layers in increasing `i` (a torch `nn.Sequential` state dict of
Linear and parameter-free layers has exactly these names), and in its string metadata:

| key | values | default when absent |
|---|---|---|
| `activation` | between layers: `none`, `relu`, `gelu` | `none` (LAION aesthetic) |
| `output` | `identity` (a score) or `sigmoid` (a probability) | `identity` |
| `normalize_input` | `true`/`false`: L2-normalise the embedding first | `true` |
| `clip` | JSON `{"model_name": ..., "pretrained": ...}` of the CLIP it was trained on | not checked |

A LAION `.pth` state dict converts with
`safetensors.torch.save_file(torch.load(path, weights_only=True), "head.safetensors")`.
`save_head` writes the format; `fit_linear_head` fits a linear or logistic head with numpy (the tests
fit theirs on the demo corpus).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipelines import storage
from pipelines.storage import StoragePath

ACTIVATIONS = ("none", "relu", "gelu")
OUTPUTS = ("identity", "sigmoid")
_LAYER = re.compile(r"^layers\.(\d+)\.(weight|bias)$")


class HeadFileMissing(FileNotFoundError):
    """The head's weights file does not exist."""


class HeadFileInvalid(ValueError):
    """The head's weights file exists but is not a head this module can run."""


@dataclass(frozen=True)
class Head:
    """A loaded head: a chain of linear layers run in numpy on (N, E) embeddings."""

    path: str
    weights: tuple[tuple[np.ndarray, np.ndarray], ...]
    """Per linear layer, (weight (out, in) float32, bias (out,) float32)."""
    activation: str = "none"
    output: str = "identity"
    normalize_input: bool = True
    clip: dict[str, Any] | None = None

    @property
    def embed_dim(self) -> int:
        return int(self.weights[0][0].shape[1])

    def __call__(self, embeddings: np.ndarray, block: int = 65536) -> np.ndarray:
        """(N,) float32 scores; in blocks, so memory stays O(block x widest layer)."""
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise ValueError(f"head {self.path} takes ({self.embed_dim},) embeddings, got shape {x.shape}")
        out = np.empty(len(x), np.float32)
        for start in range(0, len(x), block):
            h = x[start:start + block]
            if self.normalize_input:
                norm = np.linalg.norm(h, axis=1, keepdims=True)
                h = h / np.where(norm > 0, norm, 1.0)
            for n, (w, b) in enumerate(self.weights):
                h = h @ w.T + b
                if n < len(self.weights) - 1:
                    h = _activate(h, self.activation)
            h = h[:, 0]
            out[start:start + block] = 1.0 / (1.0 + np.exp(-h)) if self.output == "sigmoid" else h
        return out

    def check_clip(self, clip: dict[str, Any], embed_dim: int) -> None:
        """Refuse to run on embeddings of another CLIP (a head's space is its CLIP's)."""
        if embed_dim != self.embed_dim:
            raise HeadFileInvalid(f"head {self.path} takes {self.embed_dim}-dim embeddings; the scores hold "
                                  f"{embed_dim}-dim ones (CLIP {clip}). Use a head trained on that CLIP.")
        if self.clip is not None and self.clip != clip:
            raise HeadFileInvalid(f"head {self.path} was trained on CLIP {self.clip}; the scores were made by "
                                  f"CLIP {clip}. Use a head trained on that CLIP.")


def _activate(h: np.ndarray, activation: str) -> np.ndarray:
    if activation == "relu":
        return np.maximum(h, 0.0)
    if activation == "gelu":  # tanh approximation
        return 0.5 * h * (1.0 + np.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))
    return h


def load_head(path: str | os.PathLike | StoragePath, what: str = "classifier") -> Head:
    """Load a head file (a local path or an object-store URL); a missing or malformed file is an error
    naming the file and what to do."""
    path = storage.path(path)
    if not path.is_file():
        raise HeadFileMissing(f"{what} head file {path} does not exist: give the path of a .safetensors head "
                              f"(pipelines/heads.py describes the format; save_head writes it), or disable the "
                              f"{what} filter")
    try:
        meta, tensors = _read_safetensors(path)
    except (OSError, ValueError) as exc:
        raise HeadFileInvalid(f"{what} head file {path} is not a readable safetensors file ({exc}); a torch "
                              "state dict converts with safetensors.torch.save_file(torch.load(p, "
                              "weights_only=True), out)") from exc
    layers: dict[int, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _LAYER.match(name)
        if match is None:
            raise HeadFileInvalid(f"{what} head file {path}: unexpected tensor {name!r} (a head holds only "
                                  "layers.<i>.weight and layers.<i>.bias)")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = np.asarray(value, np.float32)
    if not layers:
        raise HeadFileInvalid(f"{what} head file {path} holds no layers.<i>.weight tensors")
    weights = []
    for i in sorted(layers):
        if "weight" not in layers[i]:
            raise HeadFileInvalid(f"{what} head file {path}: layers.{i} has a bias but no weight")
        w = layers[i]["weight"]
        b = layers[i].get("bias", np.zeros(w.shape[0], np.float32))
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise HeadFileInvalid(f"{what} head file {path}: layers.{i} has weight {w.shape}, bias {b.shape}")
        if weights and weights[-1][0].shape[0] != w.shape[1]:
            raise HeadFileInvalid(f"{what} head file {path}: layers.{i} takes {w.shape[1]} inputs but the layer "
                                  f"before gives {weights[-1][0].shape[0]}")
        weights.append((w, b))
    if weights[-1][0].shape[0] != 1:
        raise HeadFileInvalid(f"{what} head file {path}: the last layer must give one score, gives "
                              f"{weights[-1][0].shape[0]}")
    activation = meta.get("activation", "none")
    output = meta.get("output", "identity")
    if activation not in ACTIVATIONS or output not in OUTPUTS:
        raise HeadFileInvalid(f"{what} head file {path}: activation {activation!r} / output {output!r} not in "
                              f"{ACTIVATIONS} / {OUTPUTS}")
    normalize = meta.get("normalize_input", "true").lower() == "true"
    clip = json.loads(meta["clip"]) if "clip" in meta else None
    return Head(path=str(path), weights=tuple(weights), activation=activation, output=output,
                normalize_input=normalize, clip=clip)


def _read_safetensors(path: StoragePath) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of a safetensors file; one on a store is read into memory (heads are small)."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.is_local:
            with safe_open(str(path), framework="np") as f:
                return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = pathlib.Path(tmp) / "head.safetensors"
            local.write_bytes(path.read_bytes())
            with safe_open(str(local), framework="np") as f:
                return f.metadata() or {}, {name: np.array(f.get_tensor(name)) for name in f.keys()}
    except SafetensorError as exc:
        raise ValueError(str(exc)) from exc


def save_head(path: str | os.PathLike | StoragePath, weights: list[tuple[np.ndarray, np.ndarray]], *,
              activation: Literal["none", "relu", "gelu"] = "none",
              output: Literal["identity", "sigmoid"] = "identity", normalize_input: bool = True,
              clip: dict[str, Any] | None = None) -> StoragePath:
    """Write a head in the format `load_head` reads (atomically)."""
    from safetensors.numpy import save

    from pipelines.step import atomic_write_bytes

    tensors = {}
    for i, (w, b) in enumerate(weights):
        tensors[f"layers.{i}.weight"] = np.ascontiguousarray(w, np.float32)
        tensors[f"layers.{i}.bias"] = np.ascontiguousarray(b, np.float32)
    meta = {"activation": activation, "output": output, "normalize_input": str(normalize_input).lower()}
    if clip is not None:
        meta["clip"] = json.dumps(clip, sort_keys=True)
    path = storage.path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    load_head(path)  # what was written must load
    return path


def file_digest(path: str | os.PathLike | StoragePath) -> str:
    """sha256 of a head file: part of the selection step's key, so new weights at the same path reselect."""
    import hashlib

    where = storage.path(path)
    digest = hashlib.sha256()
    with where.fs.open_input_stream(where.fs_path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fit_linear_head(embeddings: np.ndarray, targets: np.ndarray, *, kind: Literal["regression", "logistic"],
                    l2: float = 1e-3, steps: int = 30) -> list[tuple[np.ndarray, np.ndarray]]:
    """A one-layer head on unit embeddings: ridge regression (closed form) or L2-regularised logistic
    regression (Newton steps). Returns `weights` for `save_head`."""
    x = np.asarray(embeddings, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = np.asarray(targets, np.float64)
    n, d = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    if kind == "regression":
        reg = l2 * n * np.eye(d + 1)
        reg[-1, -1] = 0.0
        theta = np.linalg.solve(xb.T @ xb + reg, xb.T @ y)
    elif kind == "logistic":
        theta = np.zeros(d + 1)
        reg = l2 * np.eye(d + 1)
        reg[-1, -1] = 0.0
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-np.clip(xb @ theta, -30, 30)))
            grad = xb.T @ (p - y) / n + reg @ theta
            hess = (xb * (p * (1 - p))[:, None]).T @ xb / n + reg
            theta -= np.linalg.solve(hess, grad)
    else:
        raise ValueError(f"kind must be regression or logistic, got {kind!r}")
    return [(theta[:-1][None, :].astype(np.float32), theta[-1:].astype(np.float32))]
