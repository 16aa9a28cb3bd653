"""Checkpoints: bit-exact round trip, rebuilt nets, integrity errors, no pickle, EMA + training weights."""
import json
import pickle

import pytest
import torch

from imagen_core import recipes
from imagen_core.checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    TRAIN_FILE,
    CheckpointError,
    load_checkpoint,
    load_training_checkpoint,
    read_manifest,
    save_checkpoint,
    save_training_checkpoint,
    unet_from_checkpoint,
)
from imagen_core.ema import EMA
from imagen_core.unet import EfficientUNet

torch.set_num_threads(1)


def _mixed_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    return {
        "fp32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "fp16": torch.randn(2, 2, generator=gen).to(torch.float16),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "transposed": base.t(),  # not contiguous
        "row_view": base[1],  # shares storage with `transposed`
    }


def _random_net() -> EfficientUNet:
    net = EfficientUNet(recipes.unet_tiny())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def _net_inputs(cfg):
    gen = torch.Generator().manual_seed(3)
    return (
        torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen),
        torch.randn(2, generator=gen),
        torch.randn(2, 4, cfg.text_embed_dim, generator=gen),
        torch.tensor([[True, True, False, False], [True, True, True, True]]),
    )


def test_round_trip_is_bit_exact_and_keeps_dtypes(tmp_path) -> None:
    state = _mixed_state()
    save_checkpoint(tmp_path, state, {"name": "x", "sizes": (1, 2)}, {"step": 12})
    loaded, config = load_checkpoint(tmp_path)
    assert config == {"name": "x", "sizes": [1, 2]}
    assert read_manifest(tmp_path)["extra"] == {"step": 12}
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, MODEL_FILE]  # no temp files left


def test_rebuilt_net_gives_identical_outputs(tmp_path) -> None:
    net = _random_net().eval()
    save_checkpoint(tmp_path, net.state_dict(), net.config.to_dict())
    rebuilt = unet_from_checkpoint(tmp_path).eval()
    assert rebuilt.config == net.config
    inputs = _net_inputs(net.config)
    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), net(*inputs))


def test_stage_style_config_and_prefixed_weights(tmp_path) -> None:
    net = _random_net()
    state = {f"unet.{k}": v for k, v in net.state_dict().items()}
    save_checkpoint(tmp_path, state, {"name": "base", "unet": net.config.to_dict()})
    rebuilt = unet_from_checkpoint(tmp_path, prefix="unet.")
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))
    with pytest.raises(CheckpointError, match="prefix='unet.'"):
        unet_from_checkpoint(tmp_path)


def test_truncated_file_is_reported(tmp_path) -> None:
    save_checkpoint(tmp_path, _mixed_state(), {})
    path = tmp_path / MODEL_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} has {len(data) // 2} bytes .* truncated"):
        load_checkpoint(tmp_path)


def test_changed_bytes_are_reported(tmp_path) -> None:
    save_checkpoint(tmp_path, _mixed_state(), {})
    path = tmp_path / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of tensor data; same size, still parseable
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} sha256 mismatch.*changed after saving"):
        load_checkpoint(tmp_path)


def test_missing_files_are_reported(tmp_path) -> None:
    save_checkpoint(tmp_path, _mixed_state(), {})
    with pytest.raises(CheckpointError, match=f"records no weight file '{TRAIN_FILE}'"):
        load_checkpoint(tmp_path, filename=TRAIN_FILE)
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} is missing"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is missing"):
        load_checkpoint(tmp_path / "nowhere")


def test_unparseable_config_is_reported(tmp_path) -> None:
    save_checkpoint(tmp_path, _mixed_state(), {})
    (tmp_path / CONFIG_FILE).write_text('{"format_version": 1, "config": ')
    with pytest.raises(CheckpointError, match=f"{CONFIG_FILE} is not valid JSON"):
        load_checkpoint(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    net = _random_net()
    save_checkpoint(tmp_path, net.state_dict(), net.config.to_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    rebuilt = unet_from_checkpoint(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))


def test_training_checkpoint_keeps_ema_and_raw_weights_apart(tmp_path) -> None:
    net = _random_net()
    ema = EMA(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, decay=0.999)
    save_training_checkpoint(tmp_path, net, ema, net.config.to_dict(), {"step": 5})
    manifest = read_manifest(tmp_path)
    assert sorted(manifest["files"]) == [MODEL_FILE, TRAIN_FILE]
    assert manifest["extra"] == {"step": 5, "ema_step": 1}

    resumed = EfficientUNet(net.config)
    resumed_ema = EMA(resumed)
    assert load_training_checkpoint(tmp_path, resumed, resumed_ema)["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), net.state_dict().values()))
    assert resumed_ema.step == 1
    assert all(torch.equal(resumed_ema.shadow[k], v) for k, v in ema.shadow.items())
    sampler_net = unet_from_checkpoint(tmp_path)  # model.safetensors holds the EMA weights
    assert all(torch.equal(sampler_net.state_dict()[k], v) for k, v in ema.weights().items())


def test_other_config_in_the_same_directory_is_refused(tmp_path) -> None:
    save_checkpoint(tmp_path, _mixed_state(), {"a": 1}, filename=TRAIN_FILE)
    with pytest.raises(CheckpointError, match="different config"):
        save_checkpoint(tmp_path, _mixed_state(), {"a": 2})
    save_checkpoint(tmp_path, _mixed_state(), {"a": 2}, filename=TRAIN_FILE)  # overwriting the only file is fine
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["config"] == {"a": 2}
