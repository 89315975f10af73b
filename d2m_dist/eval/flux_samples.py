"""Teacher-vs-student sample grid for presets trained on VAE latents (FLUX.1-dev).

Training has no text encoders loaded (the shards are precomputed), so the grid's
prompts are the first samples of the training shards in a fixed order: their
T5 and CLIP embeddings are what the models are conditioned on, their captions
what a reader sees. Both models start from the same noise; the latents are
decoded by the VAE of the teacher's pipeline folder (``<teacher>/vae``, or
``log.sample_vae``), inverting the precompute's ``(z - shift) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from d2m_dist.config import ConfigError
from d2m_dist.data.stream import fixed_order_stream
from d2m_dist.models.flux import unpack_latents
from d2m_dist.models.sampling import SamplerConfig, euler_sample, unit_to_uint8


@dataclass
class GridPrompts:
    embeds: torch.Tensor  # [N, T, joint_attention_dim]
    pooled: torch.Tensor  # [N, pooled_projection_dim]
    latent_shape: Tuple[int, int, int]  # (C, h, w) of one unpacked latent
    captions: List[str]


def prompts_from_shards(urls: str, count: int) -> GridPrompts:
    """The first ``count`` samples (one resolution bucket) of an unshuffled epoch over ``urls``."""
    batch = next(iter(fixed_order_stream(urls, count)))
    latents = torch.as_tensor(batch["latent"])
    return GridPrompts(torch.as_tensor(batch["prompt_embeds"]).float(), torch.as_tensor(batch["pooled"]).float(),
                       tuple(latents.shape[1:]), [str(c) for c in batch["caption"]])


def find_vae(teacher_path: str, override: Optional[str] = None) -> Optional[Path]:
    """The VAE folder: ``override``, else ``vae/`` in the teacher's pipeline folder (if there is one)."""
    if override:
        return Path(override)
    p = Path(teacher_path)
    for root in (p, p.parent) if p.is_dir() else (p.parent,):
        if (root / "vae" / "config.json").is_file():
            return root / "vae"
    return None


def load_vae(folder: Path, device: torch.device):
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the sample grid's VAE from {folder}: {str(exc).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def decode(vae, packed: torch.Tensor, latent_shape: Tuple[int, int, int]) -> torch.Tensor:
    """Packed model latents ``[B, h/2 * w/2, 4C]`` -> uint8 images ``[B, H, W, 3]``."""
    _, h, w = latent_shape
    latents = unpack_latents(packed.float(), h, w)
    cfg = vae.config
    z = latents / float(cfg.scaling_factor) + float(cfg.shift_factor or 0.0)
    param = next(vae.parameters())
    x = vae.decode(z.to(param.device, param.dtype)).sample
    return unit_to_uint8(x.permute(0, 2, 3, 1).cpu())


def sample_models(models: Sequence[torch.nn.Module], prompts: GridPrompts, sampler: SamplerConfig) -> List[torch.Tensor]:
    """Each model's packed latents for the prompts, all from the same start noise (``sampler.seed``)."""
    c, h, w = prompts.latent_shape
    out = []
    for model in models:
        was_training = model.training
        model.eval()
        out.append(euler_sample(model, prompts.embeds, prompts.pooled, grid=(h // 2, w // 2), channels=4 * c,
                                cfg=sampler))
        model.train(was_training)
    return out


def save_rgb_grid(rows: Sequence[torch.Tensor], path: str | Path, gap: int = 2) -> Path:
    """One row per model (``[N, H, W, 3]`` uint8 each), white gaps between tiles."""
    lines = []
    for imgs in rows:
        tiles = [np.pad(t.numpy(), ((gap, gap), (gap, gap), (0, 0)), constant_values=255) for t in imgs]
        lines.append(np.concatenate(tiles, axis=1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.concatenate(lines, axis=0)).save(tmp, format="PNG")
    tmp.replace(path)
    return path
