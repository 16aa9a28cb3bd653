"""Frozen text encoders returning per-token embeddings and a mask (Imagen section 2.1).

Imagen conditions every cascade stage on the full sequence of a frozen T5-XXL's encoder outputs,
not on a pooled vector; the same holds here for open_clip text towers (the paper's CLIP ablation).
`encode` gives the batch form the U-Net takes, `(embeds (B, L, D), mask (B, L) bool)` with L the
longest real token count in the batch; `encode_batched` gives each caption's real tokens only,
which is what the embedding pipeline stores (padding T5-XXL embeddings to 128 tokens costs about 35x a 256-px JPEG).

Weights are never downloaded silently into a random model: anything that cannot be found raises
`TextEncoderWeightsError` saying how to provide it.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

logger = logging.getLogger(__name__)

EncoderKind = Literal["t5", "open_clip"]
DtypeChoice = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
"""Encoders shipped inside this package (package data): `imagen-asset:tiny-t5` is ASSETS_DIR / "tiny-t5"."""
ASSET_PREFIX = "imagen-asset:"
"""`name = "imagen-asset:<dir>"`: an encoder directory shipped in imagen_core/assets/, found wherever the package
is installed (the tiny recipes' T5): a portable name, like a hub id."""
CHECKPOINT_PREFIX = "checkpoint:"
"""`checkpoint:<relative path>`: encoder files carried inside a checkpoint directory (imagen_core.checkpoint
copies a local encoder into an export); `imagen_core.checkpoint.resolve_text_encoder` makes it a path here."""
LOCAL_DIR_PREFIX = "local-dir:"


class TextEncoderWeightsError(RuntimeError):
    """The encoder's weights (or tokenizer) are not available here."""


@dataclass(kw_only=True, frozen=True)
class TextEncoderConfig:
    kind: EncoderKind = "t5"
    """Which library provides the encoder: transformers' T5 encoder or an open_clip text tower."""
    name: str = "google/t5-v1_1-xxl"
    """T5: a Hugging Face hub id, a local directory saved with save_pretrained, or "imagen-asset:<dir>" (shipped
    in the package, e.g. the tests' tiny T5). open_clip: a model architecture name (e.g. "ViT-H-14"), or an
    "hf-hub:"/"local-dir:" identifier. A local directory is copied into a stage's export (see checkpoint.py)."""
    pretrained: str | None = None
    """open_clip only: a pretrained tag (e.g. "laion2b_s32b_b79k") or a local checkpoint file.
    None builds the architecture with random weights (tests and smoke runs only)."""
    max_length: int = 128
    """Longest token sequence kept, special tokens included; longer captions are truncated.
    open_clip towers are further capped at their context length (77 for CLIP)."""
    dtype: DtypeChoice = "auto"
    """Weights and output dtype; "auto" = bfloat16 on CUDA where supported, float16 on other CUDA,
    float32 on CPU."""
    batch_size: int = 64
    """Captions per forward pass in `encode_batched`."""

    def __post_init__(self) -> None:
        if self.kind not in get_args(EncoderKind):
            raise ValueError(f"kind must be one of {get_args(EncoderKind)}, got {self.kind!r}")
        if self.dtype not in get_args(DtypeChoice):
            raise ValueError(f"dtype must be one of {get_args(DtypeChoice)}, got {self.dtype!r}")
        if not self.name:
            raise ValueError("name must name a model: a hub id, a local directory or an open_clip architecture")
        if self.kind == "t5" and self.pretrained is not None:
            raise ValueError("pretrained is an open_clip option; for T5 put the hub id or directory in name")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for a token and the end token), got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def resolve_dtype(choice: DtypeChoice, device: torch.device | str) -> torch.dtype:
    """The torch dtype for a config's `dtype` on `device` ("auto" rule in TextEncoderConfig.dtype)."""
    if choice != "auto":
        return _DTYPES[choice]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class TextEncoder(abc.ABC):
    """A frozen encoder in eval mode. Deliberately not an nn.Module: a trainer calling .train() or
    collecting .parameters() on a model that holds it must never reach these weights."""

    def __init__(self, model: nn.Module, max_length: int, batch_size: int, device: torch.device) -> None:
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device

    @property
    @abc.abstractmethod
    def embed_dim(self) -> int:
        """D, the width of each token embedding."""

    @abc.abstractmethod
    def _token_ids(self, captions: list[str]) -> list[list[int]]:
        """Each caption's ids, special tokens included, truncated to max_length, unpadded."""

    @abc.abstractmethod
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and bool mask on self.device -> (B, L, D) per-token embeddings."""

    def token_counts(self, captions: Sequence[str]) -> list[int]:
        """Real tokens per caption (what encode's mask counts): always >= 1, at most max_length."""
        return [len(ids) for ids in self._token_ids(_check_captions(captions))]

    @torch.no_grad()  # not inference_mode: its tensors could not be saved for the U-Net's backward
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (B, L, D), mask (B, L) bool), L = the longest caption's token count; padded
        positions are False in the mask and zero in embeds."""
        return self._encode_ids(self._token_ids(_check_captions(captions)))

    @torch.no_grad()
    def encode_batched(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Per-caption (n_tokens_i, D) CPU tensors in input order. Captions are grouped by token
        count so each forward pass pads as little as possible."""
        all_ids = self._token_ids(_check_captions(captions))
        order = sorted(range(len(all_ids)), key=lambda i: len(all_ids[i]))
        out: list[torch.Tensor | None] = [None] * len(all_ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            embeds, _ = self._encode_ids([all_ids[i] for i in chunk])
            for row, i in enumerate(chunk):
                # copy=True: a view would keep (and a torch.save would write) the whole batch.
                out[i] = embeds[row, :len(all_ids[i])].to("cpu", copy=True)
        return out

    def _encode_ids(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(x) for x in ids)
        padded = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for row, x in enumerate(ids):
            padded[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = True
        padded, mask = padded.to(self.device), mask.to(self.device)
        embeds = self._forward(padded, mask)
        return embeds.masked_fill(~mask[..., None], 0), mask


def _check_captions(captions: Sequence[str]) -> list[str]:
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got one string: wrap it as [caption]")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty: give at least one caption (an empty string is fine)")
    bad = [type(c).__name__ for c in captions if not isinstance(c, str)]
    if bad:
        raise TypeError(f"captions must all be str, found {sorted(set(bad))}")
    return captions


def _missing_local_path(name: str) -> bool:
    """True when `name` is meant as a filesystem path but does not exist: absolute, ./, ../, ~, or
    more than one "/" (hub ids are "name" or "namespace/name")."""
    looks_like_path = os.path.isabs(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
    return looks_like_path and not os.path.exists(os.path.expanduser(name))


def asset_path(name: str) -> Path:
    """The directory an "imagen-asset:<dir>" name refers to, inside the installed package."""
    relative = name[len(ASSET_PREFIX):] if name.startswith(ASSET_PREFIX) else name
    path = ASSETS_DIR / relative
    if not relative or ".." in Path(relative).parts or not path.is_dir():
        shipped = sorted(p.name for p in ASSETS_DIR.iterdir() if p.is_dir()) if ASSETS_DIR.is_dir() else []
        raise TextEncoderWeightsError(f"{name!r}: imagen_core ships no encoder {relative!r} (it ships {shipped})")
    return path


def _located(value: str) -> str:
    """A name/pretrained value as the loaders take it: "imagen-asset:" mapped to the installed package's
    directory; an unresolved "checkpoint:" reference refused with what to do."""
    prefix = LOCAL_DIR_PREFIX if value.startswith(LOCAL_DIR_PREFIX) else ""
    rest = value[len(prefix):]
    if rest.startswith(CHECKPOINT_PREFIX):
        raise TextEncoderWeightsError(
            f"{value!r} names encoder files carried inside a checkpoint directory; load the stage with "
            "pipelines.registry.checkpoints.load_stage (or imagen_core.checkpoint.resolve_text_encoder) so it "
            "points at them")
    if rest.startswith(ASSET_PREFIX):
        return prefix + str(asset_path(rest))
    return value


_LOCAL_FIELDS = ("name", "pretrained")


def local_files(config: TextEncoderConfig) -> dict[str, Path]:
    """The fields of `config` that name files on this machine, field -> the directory or file: a T5 `name` that
    is an existing directory, an open_clip "local-dir:" `name`, an open_clip `pretrained` that is an existing file.
    Hub ids, open_clip tags, "imagen-asset:" and "checkpoint:" names are not listed: they travel as names."""
    found: dict[str, Path] = {}
    for field in _LOCAL_FIELDS:
        value = getattr(config, field)
        if value is None:
            continue
        path = value[len(LOCAL_DIR_PREFIX):] if value.startswith(LOCAL_DIR_PREFIX) else value
        if path.startswith((ASSET_PREFIX, CHECKPOINT_PREFIX)):
            continue
        path = os.path.expanduser(path)
        if value.startswith(LOCAL_DIR_PREFIX) or (field == "name" and config.kind == "t5" and os.path.isdir(path)) \
                or (field == "pretrained" and os.path.isfile(path)):
            found[field] = Path(path).resolve()
    return found


def checkpoint_refs(config: TextEncoderConfig) -> dict[str, str]:
    """The fields of `config` that name files carried in a checkpoint: field -> the path relative to it."""
    refs = {}
    for field in _LOCAL_FIELDS:
        value = getattr(config, field) or ""
        rest = value[len(LOCAL_DIR_PREFIX):] if value.startswith(LOCAL_DIR_PREFIX) else value
        if rest.startswith(CHECKPOINT_PREFIX):
            refs[field] = rest[len(CHECKPOINT_PREFIX):]
    return refs


def with_locations(config: TextEncoderConfig, locations: dict[str, str]) -> TextEncoderConfig:
    """`config` with the given fields pointing elsewhere (a path, or "checkpoint:<relative>"), keeping a
    "local-dir:" prefix where the field had one."""
    changes = {}
    for field, location in locations.items():
        old = getattr(config, field) or ""
        changes[field] = (LOCAL_DIR_PREFIX if old.startswith(LOCAL_DIR_PREFIX) else "") + location
    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------------------- T5

class T5TextEncoder(TextEncoder):
    """transformers' T5 encoder; embeddings are last_hidden_state (Imagen: T5-XXL, D = 4096)."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int, batch_size: int, device: torch.device):
        super().__init__(model, max_length, batch_size, device)
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return self.model.config.d_model

    def _token_ids(self, captions: list[str]) -> list[list[int]]:
        # T5 appends </s> and has no start token, so an empty caption is [</s>]: mask[:, 0] holds.
        return self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def _t5_weights_error(name: str, cause: str) -> TextEncoderWeightsError:
    return TextEncoderWeightsError(
        f"Cannot load the T5 text encoder {name!r}: {cause.rstrip('.')}. Without internet access (or with "
        f"HF_HUB_OFFLINE=1) it must already be on disk: on a machine with internet run "
        f"`hf download {name} --local-dir DIR` (or from_pretrained(...).save_pretrained(DIR) for the "
        f"tokenizer and T5EncoderModel), copy DIR here and pass its path as TextEncoderConfig.name; "
        f"or set HF_HOME to a Hugging Face cache that holds {name!r}."
    )


def _load_t5(config: TextEncoderConfig, device: torch.device) -> T5TextEncoder:
    from transformers import AutoConfig, AutoTokenizer, T5EncoderModel

    name = _located(config.name)
    if _missing_local_path(name):
        raise _t5_weights_error(name, "no such local directory")
    try:
        model_config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise _t5_weights_error(name, str(error).splitlines()[0]) from error
    if model_config.model_type != "t5":
        raise ValueError(f"{name!r} is a {model_config.model_type!r} model; kind='t5' needs a T5 checkpoint")
    try:
        model, info = T5EncoderModel.from_pretrained(
            name, dtype=resolve_dtype(config.dtype, device), output_loading_info=True)
    except OSError as error:
        raise _t5_weights_error(name, str(error).splitlines()[0]) from error
    if info["missing_keys"]:
        # transformers would leave these randomly initialised; a frozen encoder must not be.
        raise _t5_weights_error(name, f"checkpoint lacks {sorted(info['missing_keys'])[:5]}")
    return T5TextEncoder(tokenizer, model.to(device), config.max_length, config.batch_size, device)


# ---------------------------------------------------------------------------------- open_clip

class _ClipTextTower(nn.Module):
    """The parts of an open_clip text tower up to (not including) pooling and projection, so that
    the vision tower and projection can be freed."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.token_embedding = source.token_embedding
        self.positional_embedding = source.positional_embedding
        self.transformer = source.transformer
        self.ln_final = source.ln_final
        self.register_buffer("attn_mask", source.attn_mask, persistent=False)
        self.context_length = source.context_length

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # open_clip's CLIP.encode_text with the sequence cut to L <= context_length: the mask is
        # causal, so position i sees only tokens <= i and the first L outputs are unchanged.
        length = ids.shape[1]
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(ids).to(cast_dtype) + self.positional_embedding[:length].to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length])
        return self.ln_final(x)


def _clip_text_source(model: nn.Module, name: str) -> nn.Module:
    """The module holding the text tower's parts; a clear error for towers this path cannot run."""
    import open_clip
    from open_clip.transformer import TextTransformer

    if isinstance(model, open_clip.CLIP):
        source = model
    elif isinstance(model, open_clip.CustomTextCLIP) and isinstance(model.text, TextTransformer):
        if model.text.cls_emb is not None:
            raise ValueError(f"open_clip model {name!r} appends a class token (CoCa style); unsupported")
        source = model.text
    else:
        text = getattr(model, "text", None)
        raise ValueError(
            f"open_clip model {name!r} is a {type(model).__name__} with text tower "
            f"{type(text).__name__}; per-token embeddings are supported for CLIP and CustomTextCLIP "
            f"with open_clip's own TextTransformer")
    if source.attn_mask is None:
        raise ValueError(f"open_clip model {name!r} has a bidirectional text tower: its token outputs "
                         "depend on the padding, so they cannot be cut to the real tokens; unsupported")
    return source


class OpenClipTextEncoder(TextEncoder):
    """An open_clip text tower's per-token outputs after ln_final (before pooling/projection)."""

    def __init__(self, tokenizer, tower: _ClipTextTower, max_length: int, batch_size: int, device: torch.device):
        super().__init__(tower, min(max_length, tower.context_length), batch_size, device)
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        return self.model.transformer.width

    def _token_ids(self, captions: list[str]) -> list[list[int]]:
        # SimpleTokenizer gives [SOT, ..., EOT, 0, 0...] and keeps EOT when it truncates; the real
        # tokens run up to and including the first EOT (0 is also a real id, "!", so not pad_id).
        padded = self.tokenizer(captions, context_length=self.max_length)
        eot = self.tokenizer.eot_token_id
        return [row[: row.index(eot) + 1] for row in padded.tolist()]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids)


def _open_clip_weights_error(config: TextEncoderConfig, cause: str) -> TextEncoderWeightsError:
    return TextEncoderWeightsError(
        f"Cannot load open_clip weights for {config.name!r} (pretrained={config.pretrained!r}): "
        f"{cause.rstrip('.')}. "
        f"Without internet access (or with HF_HUB_OFFLINE=1), download the checkpoint on a machine "
        f"with internet (e.g. open_clip.create_model({config.name!r}, pretrained=TAG) and torch.save its "
        f"state_dict, or the tag's open_clip_pytorch_model.bin), copy it here and pass its file path as "
        f"TextEncoderConfig.pretrained; or set HF_HOME to a Hugging Face cache that holds it."
    )


def _check_open_clip_source(config: TextEncoderConfig) -> None:
    """Fail before building anything: unknown architectures, HF text towers, missing files."""
    import open_clip

    schema, _ = open_clip.factory.parse_model_name(config.name)
    if schema is not None:
        return  # hf-hub:/local-dir: carry config and weights; open_clip reports what is missing
    model_config = open_clip.get_model_config(config.name)
    if model_config is None:
        raise ValueError(f"open_clip has no architecture {config.name!r}; see open_clip.list_models() "
                         "or register one with open_clip.add_model_config")
    if model_config["text_cfg"].get("hf_model_name"):
        raise ValueError(f"open_clip model {config.name!r} uses a Hugging Face text tower; unsupported "
                         "(use kind='t5' for T5, or a CLIP architecture with open_clip's own tower)")
    pretrained = config.pretrained
    if pretrained is not None and not open_clip.get_pretrained_cfg(config.name, pretrained) \
            and not os.path.isfile(os.path.expanduser(pretrained)):
        known = open_clip.list_pretrained_tags_by_model(config.name)
        raise _open_clip_weights_error(config, f"not a known tag {known} nor an existing file")


def _load_open_clip(config: TextEncoderConfig, device: torch.device) -> OpenClipTextEncoder:
    import open_clip

    located = {field: _located(value) for field in _LOCAL_FIELDS if (value := getattr(config, field)) is not None}
    config = dataclasses.replace(config, **located)
    _check_open_clip_source(config)
    loads_weights = config.pretrained is not None or config.name.startswith(("hf-hub:", "local-dir:"))
    if not loads_weights:
        logger.warning("open_clip text encoder %r built with random weights (pretrained=None)", config.name)
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    pretrained = os.path.expanduser(config.pretrained) if config.pretrained else None
    try:
        model = open_clip.create_model(config.name, pretrained=pretrained, device=device,
                                       precision=precision[resolve_dtype(config.dtype, device)])
    except (OSError, RuntimeError) as error:
        if not loads_weights:
            raise
        raise _open_clip_weights_error(config, str(error).splitlines()[0]) from error
    tower = _ClipTextTower(_clip_text_source(model, config.name))
    tokenizer = open_clip.get_tokenizer(config.name)
    if not isinstance(tokenizer, open_clip.SimpleTokenizer):
        raise ValueError(f"open_clip model {config.name!r} uses {type(tokenizer).__name__}; only CLIP's "
                         "SimpleTokenizer (start/end tokens, causal tower) is supported")
    return OpenClipTextEncoder(tokenizer, tower, config.max_length, config.batch_size, device)


_LOADERS = {"t5": _load_t5, "open_clip": _load_open_clip}


def build_text_encoder(config: TextEncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """Load the frozen encoder `config` names onto `device`; TextEncoderWeightsError if unavailable."""
    return _LOADERS[config.kind](config, torch.device(device))
