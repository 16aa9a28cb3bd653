"""CLIP for curation: load an open_clip model (named weights, a local checkpoint, or the tiny demo CLIP).

Curation needs a CLIP whose image-text similarity means something. Offline (tests, the demo) no
pretrained weights can be downloaded, so `fit_tiny_clip` trains a ~3.7M-parameter open_clip model with
open_clip's own `ClipLoss` (the symmetric InfoNCE of Radford et al. 2021) on captioned demo images, and
saves it as a folder open_clip loads natively: `open_clip_config.json` + `open_clip_model.safetensors`
(no pickle). Load it with `ClipConfig(model_name="local-dir:<folder>")` or
`ClipConfig(model_name=TINY_CLIP_NAME, pretrained="<folder>/open_clip_model.safetensors")`.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pipelines.step import atomic_write_bytes, atomic_write_json

TINY_CLIP_NAME = "imagen-tiny-clip"
# A ViT on 64x64 images in 8x8 patches and a 2-layer text transformer; 49408 x 64 token embeddings are
# most of the ~3.7M parameters (open_clip's BPE vocabulary is fixed by its tokenizer).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CHECKPOINT_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
LOCAL_DIR_PREFIX = "local-dir:"

_registered_dir: pathlib.Path | None = None


@dataclass(kw_only=True, frozen=True)
class ClipConfig:
    model_name: str
    """open_clip architecture ("ViT-B-32"), TINY_CLIP_NAME, or "local-dir:<folder>" (config + weights)."""
    pretrained: str | None = None
    """Weights: an open_clip tag ("openai", "laion2b_s34b_b79k") or a .safetensors/.pt file; must be
    None with "local-dir:" (the folder holds the weights)."""
    device: str = "cpu"
    """Torch device the model runs on."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Weights precision (open_clip's: matmul weights in 16 bits, LayerNorm in fp32). "bf16" also runs on CPU:
    on one with AVX512-BF16 (or AMX) it gives about 3x fp32's images/s, with scores within 0.01 of fp32's (see
    docs/benchmarks.md); without those instructions it still works, more slowly. "fp16" only on GPU."""
    batch_size: int = 64
    """Images or captions per forward pass."""

    def __post_init__(self) -> None:
        is_local_dir = self.model_name.startswith(LOCAL_DIR_PREFIX)
        if is_local_dir and self.pretrained is not None:
            raise ValueError(
                f"ClipConfig: model_name {self.model_name!r} already names a folder with weights; "
                f"leave pretrained=None (got {self.pretrained!r})."
            )
        if not is_local_dir and self.pretrained is None:
            raise ValueError(
                f"ClipConfig: model_name {self.model_name!r} needs pretrained weights (a tag such as "
                "'openai' or a checkpoint file): a random-init CLIP would make every curation decision "
                "noise. Offline, train one with pipelines.clip_model.fit_tiny_clip."
            )
        if self.batch_size < 1:
            raise ValueError(f"ClipConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError('ClipConfig: precision "fp16" needs a GPU (CPUs lack fp16 matmuls); on CPU use "bf16" '
                             '(about 3x fp32 on a CPU with AVX512-BF16) or "fp32"')

    @classmethod
    def tiny(cls, checkpoint: str | os.PathLike, **kwargs: Any) -> "ClipConfig":
        """The tiny demo CLIP saved by `fit_tiny_clip` (its checkpoint file or folder)."""
        path = pathlib.Path(checkpoint)
        folder = path if path.is_dir() else path.parent
        return cls(model_name=f"{LOCAL_DIR_PREFIX}{folder.resolve()}", **kwargs)


class ClipWeightsUnavailable(RuntimeError):
    """The requested CLIP weights are neither cached nor downloadable here."""


def register_tiny_clip() -> str:
    """Register TINY_CLIP_CONFIG with open_clip (idempotent, per process); returns its name."""
    global _registered_dir
    import open_clip

    if _registered_dir is None:
        _registered_dir = pathlib.Path(tempfile.mkdtemp(prefix="tiny_clip_cfg_"))
        (_registered_dir / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(_registered_dir)
    return TINY_CLIP_NAME


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes (jpg/png/...) -> RGB PIL image."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _create(config: ClipConfig, **kwargs: Any) -> tuple[Any, Any]:
    """open_clip's model and eval transform for `config` (the tiny CLIP registered and squash-resized)."""
    import open_clip

    tiny = config.model_name == TINY_CLIP_NAME
    if tiny:
        register_tiny_clip()
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.model_name, pretrained=config.pretrained, image_resize_mode="squash" if tiny else None, **kwargs)
    return model, preprocess


@dataclass(frozen=True)
class PixelTransform:
    """open_clip's eval transform cut in two. `geometry` (resize, crop, RGB: PIL -> PIL) runs where images are
    decoded and yields uint8 pixels; `mean` and `std` normalise them in `Clip.encode_pixels`, on the model's
    device. Pixels cross processes (and the PCIe bus) as uint8, a quarter of float32's bytes, and the result is
    the same tensor the whole transform gives (ToTensor is a /255 of the same values)."""

    geometry: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, preprocess: Any) -> "PixelTransform":
        from torchvision.transforms import Compose

        *geometry, to_tensor, normalize = preprocess.transforms
        if "ToTensor" not in type(to_tensor).__name__ or not hasattr(normalize, "mean"):
            raise ValueError(f"expected open_clip's eval transform to end in ToTensor, Normalize: {preprocess}")
        return cls(Compose(geometry), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std)))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> (H, W, 3) uint8 pixels, resized and cropped for the model."""
        return np.asarray(self.geometry(image).convert("RGB"), dtype=np.uint8)


def clip_preprocess(config: ClipConfig) -> PixelTransform:
    """The CPU half of the eval transform `Clip(config)` applies (see PixelTransform), without loading weights:
    what decode tasks run so that the model's actors receive uint8 pixels only."""
    try:
        _, preprocess = _create(config, load_weights=False, device="cpu")
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        raise ClipWeightsUnavailable(_missing_weights_message(config, exc)) from exc
    return PixelTransform.of(preprocess)


class Clip:
    """A loaded open_clip model with its eval preprocessing and tokenizer; returns unit-norm embeddings."""

    def __init__(self, config: ClipConfig):
        import open_clip

        self.config = config
        # The tiny CLIP by name: register its config here (Ray workers are fresh processes) and
        # preprocess as it was trained (its local-dir folder records the same in its config file).
        try:
            model, preprocess = _create(config, precision=config.precision, device=config.device)
        except (RuntimeError, FileNotFoundError, ValueError) as exc:
            raise ClipWeightsUnavailable(_missing_weights_message(config, exc)) from exc
        self.model = model.eval()
        self.preprocess = PixelTransform.of(preprocess)
        self._mean = torch.tensor(self.preprocess.mean, device=config.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=config.device).view(1, -1, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(config.model_name)
        self.embed_dim = int(self.encode_texts([""]).shape[1])  # the joint space's width, for any tower

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, E) float32 unit vectors."""
        out = []
        for start in range(0, len(images), self.config.batch_size):
            batch = np.stack([self.preprocess(im) for im in images[start : start + self.config.batch_size]])
            out.append(self.encode_pixels(batch))
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Images (N, H, W, 3) uint8, as `clip_preprocess` makes them -> (N, E) float32 unit vectors, in one
        forward pass (the caller batches). Normalised here, on the model's device: ToTensor then Normalize."""
        batch = torch.as_tensor(pixels)
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"encode_pixels takes (N, H, W, 3) uint8 pixels, got {tuple(batch.shape)} {batch.dtype}")
        x = batch.to(self.config.device).permute(0, 3, 1, 2).contiguous().float().div_(255)
        x = x.sub_(self._mean).div_(self._std)
        feats = self.model.encode_image(x.to(self._input_dtype()), normalize=True)
        return feats.float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, E) float32 unit vectors."""
        out = []
        for start in range(0, len(texts), self.config.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.config.batch_size])).to(self.config.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out)

    def _input_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.config.precision]


def check_clip_source(config: ClipConfig) -> None:
    """Cheap checks on the driver before actors start (a failing actor is retried for about a minute):
    the architecture is known, a local folder or file exists, a tag is one open_clip knows."""
    import open_clip

    if config.model_name.startswith(LOCAL_DIR_PREFIX):
        folder = pathlib.Path(config.model_name.removeprefix(LOCAL_DIR_PREFIX))
        weights = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(ext)]
        if not (folder / CONFIG_FILE).is_file() or not weights:
            raise ClipWeightsUnavailable(f"CLIP folder {folder} lacks {CONFIG_FILE} or a weights file: give a "
                                         f"folder written by fit_tiny_clip or one holding both")
        return
    if config.model_name == TINY_CLIP_NAME:
        register_tiny_clip()
    if open_clip.get_model_config(config.model_name) is None:
        raise ValueError(f"open_clip has no architecture {config.model_name!r}; see open_clip.list_models()")
    if open_clip.get_pretrained_cfg(config.model_name, config.pretrained) or os.path.isfile(config.pretrained):
        return
    known = open_clip.list_pretrained_tags_by_model(config.model_name)
    raise ClipWeightsUnavailable(f"pretrained={config.pretrained!r} is neither an existing file nor a tag of "
                                 f"{config.model_name} (known tags: {known})")


def _missing_weights_message(config: ClipConfig, exc: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"Could not load CLIP model_name={config.model_name!r} pretrained={config.pretrained!r}: {exc}\n"
        + ("HF_HUB_OFFLINE=1 is set, so only weights already in the Hugging Face cache (HF_HOME) can load. "
           if offline else "")
        + "Fix: download the weights once on a machine with network (open_clip.create_model(name, "
        "pretrained=tag) fills the cache) and point HF_HOME at that cache, or pass a local checkpoint "
        "(pretrained='/path/weights.safetensors', or model_name='local-dir:/folder' holding "
        f"{CONFIG_FILE} + {CHECKPOINT_FILE}). For tests and the offline demo, "
        "pipelines.clip_model.fit_tiny_clip trains a tiny CLIP and returns such a checkpoint."
    )


# -- the tiny demo CLIP ---------------------------------------------------------------------------
@dataclass(kw_only=True, frozen=True)
class TinyClipFit:
    """How to train the tiny CLIP."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Pairs per step; ClipLoss contrasts each image with the batch's other captions."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay after a short warm-up)."""
    weight_decay: float = 0.1
    """AdamW weight decay (open_clip's default for ViTs)."""
    seed: int = 0
    """Seed for init and batch order: the same data and seed give the same weights."""
    num_threads: int = 1
    """Torch intra-op threads while training (the test machines have 2 shared cores)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"TinyClipFit needs steps >= 1 and batch_size >= 2, got {self.steps}, {self.batch_size}")


def fit_tiny_clip(
    images: Sequence[Image.Image | bytes],
    captions: Sequence[str],
    out_dir: str | os.PathLike,
    fit: TinyClipFit = TinyClipFit(),
) -> pathlib.Path:
    """Train the tiny CLIP on matched (image, caption) pairs; returns the saved safetensors file.

    Reruns with an existing checkpoint in `out_dir` return it without training (delete it to refit).
    """
    import open_clip

    out_dir = pathlib.Path(out_dir)
    ckpt = out_dir / CHECKPOINT_FILE
    if ckpt.exists() and (out_dir / CONFIG_FILE).exists():
        return ckpt
    if len(images) != len(captions) or len(images) < fit.batch_size:
        raise ValueError(
            f"fit_tiny_clip needs as many captions as images and at least batch_size={fit.batch_size} pairs; "
            f"got {len(images)} images, {len(captions)} captions"
        )
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(fit.num_threads)
    try:
        torch.manual_seed(fit.seed)
        model = open_clip.create_model(register_tiny_clip())
        # Eval-style preprocessing for training too: the demo images are small and centred, and the
        # train transform's random resized crop would cut shapes off the canvas.
        preprocess = open_clip.image_transform(**_tiny_preprocess_kwargs(), is_train=False)
        pixels = torch.stack([preprocess(_as_pil(im)) for im in images])
        tokens = open_clip.get_tokenizer(TINY_CLIP_NAME)(list(captions))
        started = time.monotonic()
        losses = _train(model, pixels, tokens, fit)
        train_s = time.monotonic() - started
    finally:
        torch.set_num_threads(prev_threads)
    _save(model, out_dir, {"fit": fit.__dict__, "n_pairs": len(images), "train_s": round(train_s, 2),
                           "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:]))})
    return ckpt


def _train(model: torch.nn.Module, pixels: torch.Tensor, tokens: torch.Tensor, fit: TinyClipFit) -> list[float]:
    import open_clip

    loss_fn = open_clip.ClipLoss()
    # The 49408 x 64 token table is most of the parameters but only the demo's few dozen words occur:
    # keeping it at its random init saves most of each step's optimizer work, and the text transformer
    # above it learns the mapping just as well.
    model.token_embedding.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=fit.lr, weight_decay=fit.weight_decay)
    warmup = max(1, fit.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(s, fit.steps) / fit.steps))
    )
    gen = torch.Generator().manual_seed(fit.seed)
    model.train()
    losses = []
    for _ in range(fit.steps):
        idx = torch.randperm(len(pixels), generator=gen)[: fit.batch_size]
        image_features, text_features, logit_scale = model(pixels[idx], tokens[idx])
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100 (Radford et al. 2021, Sec. 2.5)
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
    model.eval()
    return losses


def _save(model: torch.nn.Module, out_dir: pathlib.Path, stats: dict[str, Any]) -> None:
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    kwargs = _tiny_preprocess_kwargs()  # inference preprocesses exactly as training did
    preprocess_cfg = {"size": kwargs["image_size"], "resize_mode": kwargs["resize_mode"],
                      "interpolation": kwargs["interpolation"]}
    atomic_write_json(out_dir / CONFIG_FILE, {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess_cfg})
    atomic_write_json(out_dir / "fit_stats.json", stats)
    atomic_write_bytes(out_dir / CHECKPOINT_FILE, save(state))  # written last: its presence means done


def _tiny_preprocess_kwargs() -> dict[str, Any]:
    """Squash-resize to the model's size (no crop), bicubic, OpenAI mean/std."""
    return {"image_size": TINY_CLIP_CONFIG["vision_cfg"]["image_size"], "resize_mode": "squash",
            "interpolation": "bicubic"}


def _as_pil(image: Image.Image | bytes) -> Image.Image:
    return decode_image(image) if isinstance(image, bytes) else image.convert("RGB")


# -- how well a CLIP separates matched from mismatched captions ---------------------------------------
def caption_separation(clip: Clip, images: Sequence[Image.Image | bytes], captions: Sequence[str],
                       seed: int = 0) -> dict[str, float]:
    """Cosine of each image with its own caption vs. with another image's caption (a derangement).

    Returns the means and the AUC: the probability that a matched pair outscores a mismatched one.
    """
    n = len(images)
    if n < 2 or len(captions) != n:
        raise ValueError(f"caption_separation needs >= 2 images and one caption each, got {n}, {len(captions)}")
    img = clip.encode_images([_as_pil(im) for im in images])
    txt = clip.encode_texts(list(captions))
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, n, size=n)  # i -> (i + shift) mod n is never i
    other = (np.arange(n) + shift) % n
    matched = (img * txt).sum(-1).numpy()
    mismatched = (img * txt[torch.from_numpy(other)]).sum(-1).numpy()
    auc = float((matched[:, None] > mismatched[None, :]).mean())
    return {"matched_mean": float(matched.mean()), "mismatched_mean": float(mismatched.mean()), "auc": auc}
