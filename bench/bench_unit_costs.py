"""Writes the unit costs `imagen plan` reads (pipelines/configs/unit_costs.json).

    python bench/bench_unit_costs.py                 # count the paper, demo and tiny cascades; keep the rest
    python bench/bench_unit_costs.py --gpu-peak-tflops 790 --clip-images-per-s 140 --source "bench_gpu.py, H100"

Counted here, on the meta device (nothing is allocated, a second per stage): each stage's training FLOPs per
image, the U-Net's forward + backward by torch.utils.flop_counter at the stage's training resolution (the
256 -> 1024 stage trains on 256 px crops, as the paper and cluster/run/paper.toml do), and the T5-XXL encoder's
parameters from its architecture. Stated (published figures, to be replaced by measurements on the user's
cluster with the flags above): img2dataset's samples/s per 16-core node, CLIP ViT-L/14 images/s per GPU, an
H100's dense bf16 matmul peak, and the stored bytes of a 1024 px JPEG.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import UNIT_COSTS as OUT, machine  # noqa: E402 - bench/ is on sys.path when a script here runs


def train_flops_per_image(recipe: str) -> tuple[int, int]:
    """(training FLOPs per image, parameters) of a stage recipe's U-Net at its training resolution."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagen_core.recipes import stage_recipe
    from imagen_core.stage import DiffusionStage

    config = stage_recipe(recipe)
    size = min(config.unet.image_size, 256)  # the 1024 px stage trains on 256 px crops
    with torch.device("meta"):
        stage = DiffusionStage(config)
        tokens, width = config.text_encoder.max_length, config.unet.text_embed_dim
        x = torch.empty(1, 3, size, size)
        logsnr = torch.zeros(1)
        lowres = torch.empty(1, 3, size, size) if config.lowres_size else None
        counter = FlopCounterMode(display=False)
        with counter:
            out = stage.unet(x, logsnr, torch.empty(1, tokens, width), torch.ones(1, tokens, dtype=torch.bool),
                             lowres=lowres, lowres_logsnr=logsnr if lowres is not None else None)
            out.float().mean().backward()
        params = sum(p.numel() for p in stage.unet.parameters())
    return int(counter.get_total_flops()), params


def t5_xxl_encoder_params() -> int:
    """google/t5-v1_1-xxl's encoder (the paper's text encoder), built on the meta device from its architecture."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    return sum(p.numel() for p in model.parameters()) - model.shared.weight.numel()  # a lookup, not FLOPs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascades", nargs="+", default=["paper", "demo", "tiny"])
    parser.add_argument("--gpu-peak-tflops", type=float, default=None, help="a measured dense bf16 peak")
    parser.add_argument("--clip-images-per-s", type=float, default=None, help="measured ViT-L/14 images/s per GPU")
    parser.add_argument("--download-samples-per-s", type=float, default=None, help="measured per CPU node")
    parser.add_argument("--source", default=None, help="where the measured figures given by flags come from")
    args = parser.parse_args()

    from imagen_core.recipes import CASCADE_RECIPES

    costs = json.loads(OUT.read_text()) if OUT.exists() else {}
    today = datetime.date.today().isoformat()
    measured = f"measured: {args.source or '?'}, {today}"
    for key, value, default, stated in (
        ("download_samples_per_s_per_node", args.download_samples_per_s, 1100.0,
         "stated: img2dataset's LAION runs, 1,000-1,300 samples/s per 16-core node"),
        ("clip_images_per_s_per_gpu", args.clip_images_per_s, 112.5,
         "stated: NeMo Curator's floor, 900 images/s per 8-GPU node"),
        ("gpu_bf16_peak_tflops", args.gpu_peak_tflops, 800.0, "stated: an H100's dense bf16 matmul peak as measured"),
    ):
        if value is not None:
            costs[key] = {"value": value, "source": measured}
        else:
            costs.setdefault(key, {"value": default, "source": stated})
    costs.setdefault("train_mfu", {"value": 0.45, "source": "stated: the GPU benchmark's goal on an H100"})
    costs.setdefault("image_bytes", {"value": 223_000, "source": "stated: a 1024 px JPEG at quality 95 of a web "
                                     "photo, about 1.7 bits per pixel"})
    started = time.perf_counter()
    costs["text_encoder"] = {"name": "t5-v1_1-xxl", "params": t5_xxl_encoder_params(), "width": 4096,
                             "mean_tokens": 32, "mfu": 0.3,
                             "source": f"counted: encoder weights x 2 FLOPs x 32 tokens per web caption at 30% "
                                       f"MFU, {today}"}
    stages = costs.setdefault("stages", {})
    for cascade in args.cascades:
        stages[cascade] = []
        for recipe in CASCADE_RECIPES[cascade]:
            flops, params = train_flops_per_image(recipe)
            stages[cascade].append({"recipe": recipe, "params": params, "train_flops_per_image": flops,
                                    "source": f"counted: torch.utils.flop_counter, {today}"})
            print(f"{recipe:<20} {params / 1e6:>9.1f}M parameters {flops / 1e12:>10.4f} TFLOP per training image")
    costs["written"] = {"by": "bench/bench_unit_costs.py", "date": today, "machine": machine(),
                        "seconds": round(time.perf_counter() - started, 1)}
    OUT.write_text(json.dumps(costs, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({machine()})")


if __name__ == "__main__":
    main()
