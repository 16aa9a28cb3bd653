"""Mixed precision: bf16 weights with fp32 diffusion maths, and bf16 training with DeepSpeed on Ray Train.

- unit (fast): the tiny base and SR stages cast to bf16 give a finite fp32 loss and bf16 gradients, run the
  U-Net in bf16 (inputs cast at the network boundary, whatever dtype they arrive in), agree with the same
  weights in fp32 to bf16 accuracy, and sample with an fp32 sampler state around bf16 network calls;
- the registry's SampleConfig(dtype="bf16") samples a cascade in bf16, close to the fp32 cascade;
- precision settings: bf16 is accepted on CPU workers, fp16 is refused there (DeepSpeed 0.19 refuses it on CPU)
  and resolves to dynamic loss scaling on GPU;
- slow: the tiny stage trains with DeepSpeed bf16 under ZeRO 1, 2 and 3 on 2 CPU workers, in one Ray session:
  each stopped (checkpointed) at step 3 and resumed to step 6; finite falling loss, bf16 ZeRO checkpoint shards,
  validation loss lower after the resume, an export of fp32 masters. The exact resumed-equals-uninterrupted
  check is test_train_runs.py's (fp32): a reference run per ZeRO stage would double this test's time.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np
import pytest
import torch

from imagen_core.diffusion import SamplerConfig, ScheduleConfig, diffusion_loss, sample
from imagen_core.recipes import stage_tiny_base, stage_tiny_sr
from imagen_core.stage import DiffusionStage
from pipelines.train.config import ScalingConfig
from pipelines.train.dsconfig import precision_dtype, resolve_deepspeed_config
from test_train_data import tiny_train_config, write_embed_shards

STAGES = {"tiny_base": stage_tiny_base, "tiny_sr": stage_tiny_sr}
pytest_plugins = ["test_registry_common"]  # its session fixtures (briefly trained stage checkpoints) are shared


def _stage(name: str, dtype: torch.dtype) -> DiffusionStage:
    """The recipe's stage with a random (not zero-initialised) output layer, so its predictions are not all 0."""
    torch.manual_seed(0)
    stage = DiffusionStage(STAGES[name]())
    torch.nn.init.normal_(stage.unet.out_conv.weight, std=0.05)
    return stage.to(dtype)


def _inputs(stage: DiffusionStage, batch: int = 3):
    """fp32 images and low-res images, fp16 text embeddings (as the embed step stores them), a padded mask."""
    cfg = stage.config
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    embeds = torch.randn(batch, 5, cfg.unet.text_embed_dim, generator=gen).half()
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])[:batch]
    lowres = torch.rand(batch, 3, cfg.lowres_size, cfg.lowres_size, generator=gen) * 2 - 1 if cfg.lowres_size else None
    return images, embeds, mask, lowres


def _record_unet_dtypes(stage: DiffusionStage) -> list[tuple[torch.dtype, torch.dtype]]:
    """(dtype entering the first convolution, dtype of the U-Net's output) of every network call."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    entering: list[torch.dtype] = []
    stage.unet.input_conv.register_forward_pre_hook(lambda module, args: entering.append(args[0].dtype))
    stage.unet.register_forward_hook(lambda module, args, out: seen.append((entering.pop(), out.dtype)))
    return seen


@pytest.mark.parametrize("name", sorted(STAGES))
def test_bf16_stage_trains_and_samples_with_fp32_maths(name: str) -> None:
    stage = _stage(name, torch.bfloat16)
    calls = _record_unet_dtypes(stage)
    images, embeds, mask, lowres = _inputs(stage)

    # Inputs in any dtype (bf16 images as DeepSpeed-style loops would pass them, fp16 embeddings).
    loss = stage(images.bfloat16(), embeds, mask, lowres, generator=torch.Generator().manual_seed(2))
    assert loss.dtype == torch.float32 and loss.shape == (3,) and torch.isfinite(loss).all(), loss
    loss.mean().backward()
    grads = [p.grad for p in stage.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().abs().sum()) for g in grads) > 0
    assert calls == [(torch.bfloat16, torch.bfloat16)]  # the network ran in bf16, its output came back to fp32

    calls.clear()
    sampler = SamplerConfig(kind="dpmpp_2m", steps=4)
    out = stage.sample(embeds, mask, lowres=lowres, sampler=sampler, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(3))
    size = stage.config.image_size
    assert out.dtype == torch.float32 and out.shape == (3, 3, size, size)
    assert torch.isfinite(out).all() and out.abs().max() <= 1.0 + 1e-6 and out.std() > 0
    assert calls == [(torch.bfloat16, torch.bfloat16)] * sampler.steps  # guided: one batched call per step
    print(f"{name} bf16: loss {[round(x, 4) for x in loss.tolist()]} ({loss.dtype}), sample {out.dtype} "
          f"in [{out.min():.3f}, {out.max():.3f}]")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_bf16_agrees_with_fp32_weights(name: str) -> None:
    """Same weights, same t and noise: the bf16 loss is the fp32 loss to bf16 accuracy, and so are samples."""
    fp32, bf16 = _stage(name, torch.float32), _stage(name, torch.bfloat16)
    images, embeds, mask, lowres = _inputs(fp32)
    gen = torch.Generator().manual_seed(4)
    t = torch.tensor([0.1, 0.5, 0.9])
    eps = torch.randn(images.shape, generator=gen)
    aug = (torch.full((3,), 0.2), torch.randn(lowres.shape, generator=gen)) if lowres is not None else (None, None)
    want = fp32.loss_at(images, embeds.float(), mask, t, eps, lowres, *aug)
    got = bf16.loss_at(images, embeds, mask, t, eps, lowres, *aug)
    assert got.dtype == torch.float32
    relative = ((got - want).abs() / want).max().item()
    assert relative < 0.03, (got, want)

    x_T = torch.randn(3, 3, fp32.config.image_size, fp32.config.image_size, generator=gen)
    kwargs = dict(lowres=lowres, sampler=SamplerConfig(steps=3), guidance_scale=1.0, x_T=x_T, aug_level=0.0)
    diff = (bf16.sample(embeds, mask, **kwargs) - fp32.sample(embeds.float(), mask, **kwargs)).abs().max().item()
    assert diff < 0.05, diff
    print(f"{name}: bf16 vs fp32 loss relative difference {relative:.1e}, sample max difference {diff:.1e}")


def test_sampler_state_stays_fp32_and_loss_is_fp32() -> None:
    dtypes = []

    def x0_fn(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        dtypes.append((x_t.dtype, logsnr.dtype))
        return (0.5 * x_t).bfloat16()  # a network answering in bf16

    x_T = torch.randn(2, 3, 4, 4).bfloat16()
    for kind in ("ancestral", "ddim", "dpmpp_2m"):
        dtypes.clear()
        out = sample(x0_fn, x_T.shape, ScheduleConfig(), SamplerConfig(kind=kind, steps=3),
                     torch.Generator().manual_seed(0), x_T=x_T)
        assert dtypes == [(torch.float32, torch.float32)] * 3, (kind, dtypes)
        assert torch.isfinite(out).all()
    loss = diffusion_loss(torch.ones(2, 3).bfloat16(), torch.zeros(2, 3).half())
    assert loss.dtype == torch.float32 and loss.tolist() == [1.0, 1.0]


def test_sample_config_dtype_samples_the_cascade_in_bf16(stage_dirs) -> None:
    """SampleConfig(dtype="bf16"): the registry path loads the stages in bf16; images come back fp32 and close to
    the fp32 cascade's for the same seed."""
    from pipelines.registry.loading import load_cascade
    from pipelines.registry.sampling import SampleConfig, sample_images

    source = [stage_dirs["base_trained"], stage_dirs["sr"]]
    prompts = ["a red square", "a blue circle"]
    config = SampleConfig(steps=3, seed=1, aug_level=0.0)
    want = sample_images(source, prompts, config)
    got = sample_images(source, prompts, dataclasses.replace(config, dtype="bf16"))
    diff = max((g.image - w.image).abs().max().item() for g, w in zip(got, want))
    assert all(o.image.dtype == torch.float32 and torch.isfinite(o.image).all() for o in got)
    assert diff < 0.1, diff
    loaded = load_cascade(source, dtype=torch.bfloat16)
    assert {p.dtype for stage in loaded.cascade.stages for p in stage.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype must be one of"):
        SampleConfig(dtype="int8")
    print(f"cascade sampled in bf16 vs fp32: max pixel difference {diff:.1e}")


def test_precision_settings(tmp_path) -> None:
    def resolve(**scaling):
        config = tiny_train_config(tmp_path, tmp_path / "out", scaling=ScalingConfig(**scaling))
        return resolve_deepspeed_config(config)

    cpu_bf16 = resolve(precision="bf16", deepspeed_config="zero2")  # CPU bf16: tests and portability
    assert cpu_bf16["bf16"]["enabled"] is True and "fp16" not in cpu_bf16
    assert precision_dtype(cpu_bf16) == torch.bfloat16
    assert precision_dtype(resolve(deepspeed_config="zero2")) == torch.float32  # "auto" on CPU
    assert precision_dtype(resolve(use_gpu=True, deepspeed_config="zero2")) == torch.bfloat16  # "auto" on GPU
    gpu_fp16 = resolve(use_gpu=True, precision="fp16", deepspeed_config="zero1")
    assert gpu_fp16["bf16"]["enabled"] is False and precision_dtype(gpu_fp16) == torch.float16
    assert gpu_fp16["fp16"]["loss_scale"] == 0 and gpu_fp16["fp16"]["auto_cast"] is False  # dynamic scaling
    with pytest.raises(ValueError, match="fp16.*use_gpu=True.*bf16"):
        ScalingConfig(precision="fp16")

    # A DeepSpeed JSON that enables fp16 itself: honoured on GPU, refused on CPU, never together with bf16.
    custom = tmp_path / "fp16.json"
    batch = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
    custom.write_text(json.dumps({**batch, "fp16": {"enabled": True}}))
    assert precision_dtype(resolve(use_gpu=True, deepspeed_config=str(custom))) == torch.float16
    with pytest.raises(ValueError, match="enables fp16.*not supported on your device"):
        resolve(deepspeed_config=str(custom))
    custom.write_text(json.dumps({**batch, "fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        resolve(use_gpu=True, deepspeed_config=str(custom))


# -- DeepSpeed bf16 on Ray Train ---------------------------------------------------------------------------

STEPS, STOP = 6, 3
"""ZeRO-2 and ZeRO-3: a fit stopped (and checkpointed) at step 3, then a resumed fit to step 6. ZeRO-1: one fit
to step 6; its optimiser and checkpoint code are ZeRO-2's (DeepSpeed's stage_1_and_2), whose resume is shown. A
fit is mostly fixed cost (Ray Train workers, DeepSpeed initialisation, Ray Data start-up), so the steps are few."""


@pytest.fixture(scope="module")
def bf16_data(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("embed_bf16")
    write_embed_shards(directory, 48)
    return directory


def _bf16_config(data_dir: pathlib.Path, out: pathlib.Path, zero: int):
    from test_train_runs import deepspeed_json, shared_tracking

    out.mkdir(parents=True, exist_ok=True)
    config = tiny_train_config(data_dir, out, deepspeed_config=deepspeed_json(zero, out), total_steps=STEPS,
                               stop_at_step=STOP, run_name=f"bf16-zero{zero}")
    config = shared_tracking(config, f"sqlite:///{data_dir.parent / 'bf16-mlflow.db'}")
    return dataclasses.replace(
        config,
        checkpoint=dataclasses.replace(config.checkpoint, every_steps=STOP),
        tracking=dataclasses.replace(config.tracking, log_every=STOP, val_every=STOP, sample_every=STEPS),
        scaling=dataclasses.replace(config.scaling, precision="bf16"),
    )


@pytest.mark.slow
def test_deepspeed_bf16_trains_under_zero_1_2_3_and_resumes_under_2_3(ray_session, bf16_data, tmp_path) -> None:
    from imagen_core.checkpoint import MODEL_FILE, TRAIN_FILE, load_checkpoint
    from pipelines.train.ledger import read_ledger, status_path
    from test_train_runs import mean_step_losses, train

    report = []
    for zero in (1, 2, 3):
        start = time.monotonic()
        config = _bf16_config(bf16_data, tmp_path / f"zero{zero}", zero)
        resumes = zero != 1
        stopped = train(config if resumes else dataclasses.replace(config, stop_at_step=None))
        out = pathlib.Path(config.output_dir)
        resumed = train(dataclasses.replace(config, stop_at_step=None, resume=True)) if resumes else stopped
        seconds = time.monotonic() - start

        ds = json.loads((out / "deepspeed.json").read_text())
        assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == zero
        # DeepSpeed names its ZeRO optimiser shards bf16_* when the engine ran in bf16.
        shards = sorted(p.name for p in pathlib.Path(resumed.checkpoint_dir).rglob("*optim_states.pt"))
        assert len(shards) == 2 and all(name.startswith("bf16_zero_pp_rank_") for name in shards), shards

        assert resumed.metrics["step"] == STEPS
        ledger = read_ledger(out)
        assert sorted(step for rank, step in ledger if rank == 0) == list(range(1, STEPS + 1))
        losses = mean_step_losses(ledger, STEPS, 2)
        assert np.isfinite(losses).all() and np.mean(losses[STOP:]) < np.mean(losses[:STOP]), losses
        if resumes:
            assert stopped.metrics["step"] == STOP
            assert json.loads(status_path(out, 0).read_text())["restored_step"] == STOP
            # Validation at fixed t and noise (deterministic), on the training weights: lower after the resumed
            # steps than at the stop, so the resumed fit went on from the checkpoint (a fresh start would be back up).
            val = stopped.metrics["val_loss_train_weights"], resumed.metrics["val_loss_train_weights"]
            assert np.isfinite(val).all() and val[1] < val[0], val
        # The export holds the gathered fp32 masters and their EMA, not bf16-rounded weights.
        final, _ = load_checkpoint(out / "export", filename=TRAIN_FILE)
        ema, _ = load_checkpoint(out / "export", filename=MODEL_FILE)
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in [*final.values(), *ema.values()])
        assert any((v != v.bfloat16().float()).any() for v in final.values())  # finer than bf16: the masters
        how = f"stop at {STOP} + resume to {STEPS}" if resumes else f"one fit to {STEPS}"
        report.append(f"ZeRO-{zero} bf16: step losses {[round(x, 4) for x in losses]} (first {losses[0]:.4f}, last "
                      f"{losses[-1]:.4f}); {how}: {seconds:.0f} s")
    print("\n".join(report))
