"""What several FLUX loaders share: FLUX.1-dev's architecture, dtype names, the load error, file checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from d2m_dist.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# diffusers' config of black-forest-labs/FLUX.1-dev transformer/config.json
FLUX1_DEV_CONFIG: Dict = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}


# Architectures known by name, for dry runs without any file: ``teacher.path=meta:flux1-dev``.
BUILTIN_CONFIGS: Dict[str, Dict] = {"meta:flux1-dev": FLUX1_DEV_CONFIG}


class TeacherLoadError(ConfigError):
    """The teacher path does not hold a loadable FLUX transformer."""


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def read_safetensors_header(f: Path) -> Dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, byte ranges), or a one-line error."""
    return _header_and_length(f)[0]


def _header_and_length(f: Path) -> Tuple[Dict, int]:
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if 8 + header_len > size:
                raise ValueError
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise TeacherLoadError(f"teacher weights {f}: truncated or not safetensors (bad header)") from None
    return header, header_len


def check_safetensors_extent(f: Path) -> None:
    """The header promises byte ranges; a truncated file stops short of them."""
    size = f.stat().st_size
    header, header_len = _header_and_length(f)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise TeacherLoadError(f"teacher weights {f}: truncated ({size} bytes, header needs {8 + header_len + end})")
