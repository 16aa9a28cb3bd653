"""Images between the model's convention (float (B, C, H, W) in [-1, 1]) and PNG files or bytes."""
from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding to the nearest level."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_pil(image: Image.Image, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """A PIL image -> (1, C, size, size) in [-1, 1]; resized (bicubic) when `size` differs."""
    image = image.convert(mode)
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    return torch.from_numpy(array / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()


def read_image(path: str | os.PathLike, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """An image file -> (1, C, H, W) in [-1, 1] (mode "L" for one-channel masks)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    with Image.open(path) as image:
        return from_pil(image, size, mode)


def png_bytes(image: torch.Tensor) -> bytes:
    """One image (3, H, W) in [-1, 1] -> PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes, size: int | None = None) -> torch.Tensor:
    """PNG (or any PIL-readable) bytes -> (1, 3, H, W) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        return from_pil(image, size)


def write_png(image: torch.Tensor, path: str | os.PathLike) -> pathlib.Path:
    """Write one image (3, H, W) in [-1, 1] as PNG, creating the folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (what CLIP preprocessing takes)."""
    return [Image.fromarray(array) for array in to_uint8(images)]
