"""The functions Ray Data runs on the training input (the split filter and the image decoding), apart from the
rest of pipelines.train.data: they are pickled into the input pipeline, so every process that unpickles it (the
train run's DatasetManager and SplitCoordinator actors, the map tasks' workers) imports this module. It needs
numpy and Pillow only; torch (about 1.5 s of CPU per process on 2 cores) loads where a super-resolution stage's
low-resolution images are made, not where the pipeline is merely held.
"""
from __future__ import annotations

import hashlib
import io
from typing import Literal

import numpy as np

Split = Literal["train", "val"]


def held_out(key: str, fraction: float) -> bool:
    """Stable split by key: the same rows are held out on every run, stage and machine."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


class SelectSplit:
    """map_batches filter keeping one split's rows."""

    def __init__(self, split: Split, fraction: float) -> None:
        self.split, self.fraction = split, fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([held_out(str(k), self.fraction) == (self.split == "val") for k in batch["key"]], dtype=bool)
        return {name: column[keep] for name, column in batch.items()}


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> (size, size, 3) uint8: short side resized to `size` (bicubic, antialiased), centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """The low-resolution conditioning images (B, size, size, 3) uint8 of an SR stage, from the same crops.

    The stage's own `resize_lowres`, so that training sees the degradation evaluation and the cascade apply.
    """
    import torch

    from imagen_core.stage import resize_lowres

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    low = resize_lowres(x, size).round().clamp(0, 255).to(torch.uint8)
    return low.permute(0, 2, 3, 1).contiguous().numpy()


class DecodeImages:
    """Ray Data map_batches task: encoded images -> fixed-size uint8 arrays (and low-res ones for SR)."""

    def __init__(self, image_size: int, lowres_size: int | None) -> None:
        self.image_size, self.lowres_size = image_size, lowres_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [decode_image(bytes(b), self.image_size) for b in batch["image"]]
        out = {
            "key": batch["key"],
            "caption": batch["caption"],
            "n_tokens": batch["n_tokens"].astype(np.int32),
            "text_embedding": batch["text_embedding"],
            "image": np.stack(images) if images else np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
        }
        if self.lowres_size is not None:
            out["lowres"] = downsample(out["image"], self.lowres_size)
        return out
