"""Checkpoints: safetensors weights plus a `config.json` that is enough to rebuild the network.

A checkpoint directory holds one or more weight files and one manifest:

    model.safetensors   weights to sample with (the EMA weights when training keeps an EMA)
    train.safetensors   optional: the raw training weights, for resuming
    config.json         {"format_version", "config", "extra", "files": {name: {"sha256", "bytes"}}}

Every file is written to a temporary name and moved into place with os.replace, config.json last: no file is
ever half-written, and a crash between the two leaves weights that fail verification against the old
config.json instead of a silently mixed checkpoint. Loading checks each weight file's size and sha256
against config.json before parsing it, and parses with safetensors only: nothing is ever unpickled.

A stage checkpoint is portable: its config names the text encoder by a hub id or a name shipped with the package
("imagen-asset:tiny-t5"), or carries the encoder's files. `carry_text_encoder` copies an encoder named by a local
path (a T5 directory, an open_clip "local-dir:" folder or checkpoint file) into `text_encoder/` beside the weights,
records each file's sha256 in config.json ("text_encoder_files") and points the config at it as
"checkpoint:text_encoder/..."; `resolve_text_encoder` turns that back into a path on the loading machine (a
verified copy in a content-addressed cache, so stages carrying the same encoder share one directory and one
loaded encoder).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from imagen_core import text_encoder as _te
from imagen_core.ema import EMA, STEP_KEY
from imagen_core.unet import EfficientUNet, UNetConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the config.json layout; bump it when the layout changes."""
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
"""Weights to sample with: the EMA weights for a stage trained with an EMA."""
TRAIN_FILE = "train.safetensors"
"""Raw training weights, kept beside the EMA ones to resume training."""
EMA_STEP_KEY = "ema_step"
"""Key in `extra` holding the EMA's update count (see `save_training_checkpoint`)."""
ENCODER_DIR = "text_encoder"
"""Subdirectory holding a carried text encoder's files (see `carry_text_encoder`)."""
ENCODER_FILES_KEY = "text_encoder_files"
"""config.json key: {relative path: {"sha256", "bytes"}} of the carried encoder files."""
ENCODER_SOURCE_KEY = "text_encoder_source"
"""config.json key: the encoder fields as they were before they were carried (provenance only)."""
CACHE_ENV = "IMAGEN_CACHE_DIR"
"""Where carried encoders are unpacked on the loading machine (default: $XDG_CACHE_HOME or ~/.cache, then
imagen-cluster/)."""
_SKIPPED_WEIGHT_FORMATS = (".bin", ".h5", ".msgpack", ".ckpt", ".ot")
"""Weights in other formats, left behind when a T5 directory also holds safetensors (what transformers loads)."""
_HASH_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, altered or unreadable; the message names the file and the problem."""


def save_checkpoint(
    directory: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    filename: str = MODEL_FILE,
) -> Path:
    """Write `state_dict` to `directory/filename` and record it in `directory/config.json`.

    Other weight files already recorded in the directory are kept when their config equals `config`
    (so EMA and training weights can be written one after the other). Returns the weights file's path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _check_filename(filename)
    files = _files_to_keep(directory, config, filename)
    weights_path = directory / filename
    tmp = _temp_path(directory, filename)
    try:
        safetensors.torch.save_file(_prepare_tensors(state_dict), str(tmp))
        _fsync(tmp)
        files[filename] = {"sha256": _sha256(tmp), "bytes": tmp.stat().st_size}
        os.replace(tmp, weights_path)
    finally:
        tmp.unlink(missing_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "config": config, "extra": extra or {}, "files": files}
    if (directory / CONFIG_FILE).is_file() and _same_config(directory, config):
        manifest.update(_carried_records(directory))  # a carried encoder stays with the config that names it
    _write_json_atomic(directory / CONFIG_FILE, manifest)
    return weights_path


def load_checkpoint(
    directory: str | os.PathLike[str], *, filename: str = MODEL_FILE, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read `(state_dict, config)` back, after checking the file's size and sha256 against config.json."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    path = directory / filename
    record = manifest["files"].get(filename)
    if record is None:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} records no weight file {filename!r} (it records {sorted(manifest['files'])})"
        )
    _verify(path, record)
    try:
        state = safetensors.torch.load_file(str(path), device=str(device))
    except Exception as error:  # safetensors raises its own error types; name the file and keep the cause
        raise CheckpointError(f"{path} passed its checksum but safetensors cannot parse it: {error}") from error
    return state, manifest["config"]


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed and checked config.json of a checkpoint directory (config, extra, file records)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a checkpoint (or it was not finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the file is damaged") from error
    if not isinstance(manifest, dict) or not {"format_version", "config", "files"} <= manifest.keys():
        raise CheckpointError(f"{path} lacks format_version/config/files: not written by save_checkpoint")
    if manifest["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {manifest['format_version']}; this code reads version {FORMAT_VERSION}"
        )
    manifest.setdefault("extra", {})
    return manifest


def unet_config_from(config: dict[str, Any]) -> UNetConfig:
    """The U-Net config inside a checkpoint config: either a UNetConfig dict or a stage config with a "unet" entry."""
    return UNetConfig.from_dict(config["unet"] if "unet" in config else config)


def unet_from_checkpoint(
    directory: str | os.PathLike[str],
    *,
    filename: str = MODEL_FILE,
    prefix: str = "",
    device: str | torch.device = "cpu",
) -> EfficientUNet:
    """Rebuild a U-Net from its checkpoint alone. `prefix` selects the U-Net's weights in a larger state dict
    (e.g. "unet." when a whole stage module was saved)."""
    state, config = load_checkpoint(directory, filename=filename, device=device)
    net = EfficientUNet(unet_config_from(config)).to(device)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{Path(directory) / filename} does not match the U-Net its config.json describes "
            f"(prefix={prefix!r}; a whole-stage state dict needs prefix='unet.'): {error}"
        ) from error
    return net


def save_training_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    ema: EMA,
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """EMA weights to model.safetensors (what sampling and the registry load), raw weights to train.safetensors,
    the EMA step count into extra[EMA_STEP_KEY]. The two are never mixed up on resume."""
    extra = {**(extra or {}), EMA_STEP_KEY: ema.step}
    save_checkpoint(directory, model.state_dict(), config, extra, filename=TRAIN_FILE)
    save_checkpoint(directory, ema.weights(), config, extra, filename=MODEL_FILE)


def load_training_checkpoint(
    directory: str | os.PathLike[str], model: nn.Module, ema: EMA
) -> dict[str, Any]:
    """Restore what `save_training_checkpoint` wrote: raw weights into `model`, EMA weights and step into `ema`.
    Returns `extra`."""
    train_state, _ = load_checkpoint(directory, filename=TRAIN_FILE)
    ema_state, _ = load_checkpoint(directory, filename=MODEL_FILE)
    extra = read_manifest(directory)["extra"]
    if EMA_STEP_KEY not in extra:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE} has no extra[{EMA_STEP_KEY!r}]: not a training checkpoint"
        )
    model.load_state_dict(train_state, strict=True)
    ema.load_state_dict({**ema_state, STEP_KEY: torch.tensor(extra[EMA_STEP_KEY])})
    return extra


def carry_text_encoder(directory: str | os.PathLike[str]) -> bool:
    """Make a checkpoint's text encoder travel with it: when its config names the encoder by a local path,
    copy those files into `directory/text_encoder/`, record their sha256 and point the config at them
    ("checkpoint:text_encoder/..."). Hub ids, open_clip tags and "imagen-asset:" names are left as they are.
    Returns whether anything was carried. Call it after the last weights file is written."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    encoder = _encoder_config(manifest["config"])
    local = _te.local_files(encoder) if encoder is not None else {}
    if not local:
        return False
    target = directory / ENCODER_DIR
    if target.exists():
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{ENCODER_DIR}.", dir=directory))
    records: dict[str, dict[str, Any]] = {}
    locations: dict[str, str] = {}
    try:
        for field, source in local.items():
            if source.is_dir():
                sub = "" if field == "name" else source.name
                names = _encoder_dir_files(source)
                if not names:
                    raise CheckpointError(f"text encoder directory {source} ({field}) holds no files to carry")
                for name in names:
                    records[_carried_name(sub, name)] = _copy_file(source / name, staging / sub / name)
                locations[field] = _te.CHECKPOINT_PREFIX + _carried_name(sub)
            elif source.is_file():
                records[_carried_name(source.name)] = _copy_file(source, staging / source.name)
                locations[field] = _te.CHECKPOINT_PREFIX + _carried_name(source.name)
            else:
                raise CheckpointError(f"text encoder {field} {source} does not exist: nothing to carry")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    carried = _te.with_locations(encoder, locations)
    manifest["config"] = {**manifest["config"], "text_encoder": {**manifest["config"]["text_encoder"],
                                                                  **{f: getattr(carried, f) for f in locations}}}
    manifest[ENCODER_FILES_KEY] = records
    manifest[ENCODER_SOURCE_KEY] = {field: getattr(encoder, field) for field in locations}
    _write_json_atomic(directory / CONFIG_FILE, manifest)
    size = sum(r["bytes"] for r in records.values())
    logger.info("carried text encoder %s into %s (%d files, %.1f MB)", dict(local), target, len(records), size / 1e6)
    return True


def carried_files(directory: str | os.PathLike[str]) -> list[str]:
    """Paths (relative to `directory`) of the encoder files its config.json records: what a copy must take."""
    return sorted(read_manifest(directory).get(ENCODER_FILES_KEY, {}))


def resolve_text_encoder(
    directory: str | os.PathLike[str], config: dict[str, Any], *, cache_dir: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """`config` (a checkpoint's stage config) with "checkpoint:..." encoder references made paths on this
    machine. The carried files are verified against config.json and unpacked into a cache directory named by
    their hashes (`cache_dir`, default $IMAGEN_CACHE_DIR or ~/.cache/imagen-cluster), which outlives
    `directory` (a registry download may be temporary). Configs without references come back unchanged."""
    encoder = _encoder_config(config)
    refs = _te.checkpoint_refs(encoder) if encoder is not None else {}
    if not refs:
        return config
    directory = Path(directory)
    records = read_manifest(directory).get(ENCODER_FILES_KEY, {})
    for field, relative in refs.items():
        if not any(name == relative or name.startswith(relative.rstrip("/") + "/") for name in records):
            raise CheckpointError(
                f"{directory / CONFIG_FILE}: the text encoder's {field} is {_te.CHECKPOINT_PREFIX}{relative} but "
                f"config.json records no such carried file (it records {sorted(records)[:5]})")
    root = _unpack_encoder(directory, records, Path(cache_dir) if cache_dir else _cache_root())
    resolved = _te.with_locations(encoder, {f: str(root / rel) for f, rel in refs.items()})
    return {**config, "text_encoder": {**config["text_encoder"], **{f: getattr(resolved, f) for f in refs}}}


def _encoder_config(config: dict[str, Any]) -> Any:
    """The TextEncoderConfig inside a stage config dict (None for a checkpoint of a bare U-Net)."""
    from imagen_core.config_io import build

    data = config.get("text_encoder") if isinstance(config, dict) else None
    return build(_te.TextEncoderConfig, data) if isinstance(data, dict) else None


def _carried_name(*parts: str) -> str:
    return "/".join([ENCODER_DIR, *(p for p in parts if p)])


def _encoder_dir_files(source: Path) -> list[str]:
    """Files of an encoder directory to carry (relative, "/"-separated): all but hidden entries (e.g. the
    .cache of `hf download`) and, beside safetensors, the same weights in other formats."""
    names = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            names.append(relative.as_posix())
    if any(n.endswith(".safetensors") for n in names):
        names = [n for n in names if not n.endswith(_SKIPPED_WEIGHT_FORMATS)]
    return names


def _copy_file(source: Path, destination: Path) -> dict[str, Any]:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, destination)
    os.chmod(destination, 0o644)
    return {"sha256": _sha256(destination), "bytes": destination.stat().st_size}


def _cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imagen-cluster"


def _unpack_encoder(directory: Path, records: dict[str, dict[str, Any]], cache_root: Path) -> Path:
    """A directory holding the carried files (under text_encoder/ as in the checkpoint), named by their
    hashes: made once per content, atomically, after verifying every file; reused afterwards."""
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:32]
    root = cache_root / "text-encoders" / digest
    if root.is_dir():
        return root
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=root.parent))
    except OSError as error:
        raise CheckpointError(
            f"cannot unpack the text encoder carried in {directory} into {root.parent} ({error}); set "
            f"{CACHE_ENV} to a writable directory") from error
    try:
        for name, record in records.items():
            parts = Path(name).parts
            if Path(name).is_absolute() or not parts or parts[0] != ENCODER_DIR or ".." in parts:
                raise CheckpointError(f"{directory / CONFIG_FILE} records a carried file {name!r} outside {ENCODER_DIR}/")
            _verify(directory / name, record)
            destination = staging / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(directory / name, destination)
        try:
            os.replace(staging, root)
        except OSError:
            if not root.is_dir():  # another process made it first: theirs is the same content
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _carried_records(directory: Path) -> dict[str, Any]:
    manifest = read_manifest(directory)
    return {k: manifest[k] for k in (ENCODER_FILES_KEY, ENCODER_SOURCE_KEY) if k in manifest}


def _same_config(directory: Path, config: dict[str, Any]) -> bool:
    return _normalise(read_manifest(directory)["config"]) == _normalise(config)


def _verify(path: Path, record: dict[str, Any]) -> None:
    """Size first (cheap, catches truncation), then the sha256 (catches any changed byte)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (config.json records it with {record['bytes']} bytes)")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CheckpointError(
            f"{path} has {size} bytes but config.json records {record['bytes']}: the file is truncated or was replaced"
        )
    digest = _sha256(path)
    if digest != record["sha256"]:
        raise CheckpointError(
            f"{path} sha256 mismatch: config.json records {record['sha256']}, the file hashes to {digest}; "
            "its bytes were changed after saving"
        )


def _files_to_keep(directory: Path, config: dict[str, Any], filename: str) -> dict[str, dict[str, Any]]:
    """File records of an existing manifest that stay valid beside the file being written."""
    if not (directory / CONFIG_FILE).is_file():
        return {}
    manifest = read_manifest(directory)
    others = {name: rec for name, rec in manifest["files"].items() if name != filename}
    if others and _normalise(manifest["config"]) != _normalise(config):
        raise CheckpointError(
            f"{directory} already holds {sorted(others)} saved with a different config; "
            "write this checkpoint to a new directory"
        )
    return others


def _prepare_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared storage, e.g. views of one buffer)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def _normalise(config: dict[str, Any]) -> Any:
    """A config as JSON would give it back (tuples become lists), for comparison."""
    return json.loads(json.dumps(config))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    try:
        text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"config/extra for {path} is not JSON-serialisable: {error}") from error
    tmp = _temp_path(path.parent, path.name)
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_path(directory: Path, name: str) -> Path:
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(handle)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is read by other processes (serving, registry)
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_filename(filename: str) -> None:
    if filename == CONFIG_FILE or Path(filename).name != filename or not filename.endswith(".safetensors"):
        raise ValueError(f"weights filename must be a plain '<name>.safetensors' in the directory, got {filename!r}")
