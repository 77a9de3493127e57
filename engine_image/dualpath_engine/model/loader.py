"""Build the decoder from ``dualpath_engine.config.ModelConfig``; save and load weights as safetensors.

Called by ``dualpath_engine.__main__`` (engine start-up), tests and benchmarks. Nothing is downloaded:
weights come from a seeded random init or a local safetensors file whose metadata records the
geometry, checked on load.
"""

from __future__ import annotations

import json
import os

import safetensors.torch
import torch

from dualpath_engine import config
from dualpath_engine import tokenizer as tok
from dualpath_engine.model import llama

_GEOMETRY_KEY = "dualpath.geometry"


def geometry(model_config: config.ModelConfig) -> llama.Geometry:
    """The decoder geometry a model configuration describes."""
    if model_config.vocab_size < tok.VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {model_config.vocab_size} is smaller than the tokenizer's {tok.VOCAB_SIZE} ids"
        )
    return llama.Geometry(
        vocab_size=model_config.vocab_size,
        hidden_size=model_config.hidden_size,
        num_layers=model_config.num_layers,
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        intermediate_size=model_config.intermediate_size,
        dtype=llama.dtype_from_name(model_config.dtype),
        rope_theta=model_config.rope_theta,
        norm_eps=model_config.rms_norm_eps,
    )


def _geometry_text(geo: llama.Geometry) -> str:
    fields = {
        "vocab_size": geo.vocab_size,
        "hidden_size": geo.hidden_size,
        "num_layers": geo.num_layers,
        "num_heads": geo.num_heads,
        "num_kv_heads": geo.num_kv_heads,
        "head_dim": geo.head_dim,
        "intermediate_size": geo.intermediate_size,
        "dtype": str(geo.dtype),
    }
    return json.dumps(fields, sort_keys=True)


def build(model_config: config.ModelConfig, device: torch.device | str = "cpu") -> llama.Decoder:
    """The decoder on ``device``: loaded from ``weights_path`` if set, else seeded random init."""
    geo = geometry(model_config)
    model = llama.Decoder(geo)
    if model_config.weights_path is not None:
        load_weights(model, model_config.weights_path)
    else:
        model.init_weights(model_config.seed)
    model = model.to(dtype=geo.dtype)
    # Norm weights stay float32-exact ones in any dtype; RMSNorm computes in float32 anyway.
    return model.to(torch.device(device)).eval()


def save_weights(model: llama.Decoder, path: str | os.PathLike[str]) -> None:
    """Write all weights and the geometry (as metadata) to a safetensors file."""
    tensors = {name: param.detach().contiguous().cpu() for name, param in model.state_dict().items()}
    safetensors.torch.save_file(tensors, os.fspath(path), metadata={_GEOMETRY_KEY: _geometry_text(model.geo)})


def load_weights(model: llama.Decoder, path: str | os.PathLike[str]) -> None:
    """Load weights saved by :func:`save_weights`; ValueError if the file's geometry differs."""
    with safetensors.safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = set(handle.keys())
    saved = metadata.get(_GEOMETRY_KEY)
    expected = _geometry_text(model.geo)
    if saved is not None and saved != expected:
        raise ValueError(f"weights file {path} has geometry {saved}, the model expects {expected}")
    missing = set(model.state_dict()) - names
    if missing:
        raise ValueError(f"weights file {path} lacks tensors: {', '.join(sorted(missing))}")
    state = safetensors.torch.load_file(os.fspath(path))
    model.load_state_dict(state, strict=True)
