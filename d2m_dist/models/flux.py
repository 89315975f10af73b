"""Loading the dense FLUX teacher through diffusers, and calling it.

The architecture is diffusers' ``FluxTransformer2DModel``; nothing here forks
FLUX's code. A teacher comes from a diffusers pipeline folder (its
``transformer/`` subfolder is used), a transformer folder, or — for dry runs
and parameter accounting — a config alone on the meta device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open

from d2m_dist.config import TeacherConfig
from d2m_dist.models.flux_config import (  # noqa: F401  (re-exported: the loaders' public names)
    BUILTIN_CONFIGS,
    DTYPES,
    FLUX1_DEV_CONFIG,
    TeacherLoadError,
    check_safetensors_extent,
    parse_dtype,
)
from d2m_dist.models.flux_single_file import (
    infer_config,
    original_to_diffusers,
    read_original_checkpoint,
)


def resolve_transformer_dir(path: str | Path) -> Path:
    """The folder holding the transformer's ``config.json``.

    Accepts a pipeline root (``model_index.json`` + ``transformer/``) or the
    transformer folder itself. Raises :class:`TeacherLoadError` naming the path.
    """
    p = Path(path)
    if not p.exists():
        raise TeacherLoadError(f"teacher not found: {p}")
    if p.is_file():
        raise TeacherLoadError(f"teacher {p}: expected a diffusers folder, got a file")
    if (p / "model_index.json").is_file() or (p / "transformer").is_dir():
        p = p / "transformer"
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise TeacherLoadError(f"teacher {p}: no config.json (not a diffusers model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherLoadError(f"teacher {cfg_file}: unreadable config ({exc.__class__.__name__})") from None
    if cfg.get("_class_name") != "FluxTransformer2DModel":
        raise TeacherLoadError(
            f"teacher {cfg_file}: model class is {cfg.get('_class_name')!r}, not FluxTransformer2DModel"
        )
    return p


def _check_weights(folder: Path) -> None:
    """Open every safetensors file once so that a truncated file fails by name, fast."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TeacherLoadError(f"teacher {folder}: no .safetensors weights")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise TeacherLoadError(f"teacher {folder}: missing weight shard {missing[0]}")
    for f in files:
        check_safetensors_extent(f)
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception as exc:
            raise TeacherLoadError(f"teacher weights {f}: unreadable ({str(exc).splitlines()[0]})") from None


def load_flux_config(path: str | Path) -> Dict:
    """A diffusers FLUX config from a built-in name, a config.json file or a model folder."""
    if str(path) in BUILTIN_CONFIGS:
        return dict(BUILTIN_CONFIGS[str(path)])
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise TeacherLoadError(f"teacher config {p}: invalid JSON ({exc.msg})") from None
    return dict(FluxTransformer2DModel.load_config(str(resolve_transformer_dir(path))))


def build_flux(config: Dict, *, dtype: torch.dtype = torch.float32, meta: bool = False) -> FluxTransformer2DModel:
    """An uninitialised-by-checkpoint FLUX transformer from a diffusers config dict."""
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if meta:
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config)
    else:
        model = FluxTransformer2DModel.from_config(config)
    # from_config builds fp32; casting only when asked avoids diffusers' cast warning
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def load_teacher(cfg: TeacherConfig, *, meta: bool = False) -> FluxTransformer2DModel:
    """The frozen dense teacher from ``cfg.path`` (eval mode, no grads)."""
    dtype = parse_dtype(cfg.dtype)
    if str(cfg.path) in BUILTIN_CONFIGS:
        if not meta:
            raise TeacherLoadError(f"teacher {cfg.path} is an architecture without weights: usable for dry runs only")
        return build_flux(load_flux_config(cfg.path), dtype=dtype, meta=True).eval().requires_grad_(False)
    if Path(cfg.path).is_file():
        model = _load_single_file(cfg, dtype, meta)
        model.eval().requires_grad_(False)
        return model
    folder = resolve_transformer_dir(cfg.path)
    if meta:
        model = build_flux(load_flux_config(folder), dtype=dtype, meta=True)
    else:
        _check_weights(folder)
        try:
            model = FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype)
        except Exception as exc:
            raise TeacherLoadError(f"teacher {folder}: {str(exc).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    return model


def _load_single_file(cfg: TeacherConfig, dtype: torch.dtype, meta: bool) -> FluxTransformer2DModel:
    """An original-layout single-file checkpoint (``flux1-dev.safetensors``)."""
    path = Path(cfg.path)
    if path.suffix != ".safetensors":
        raise TeacherLoadError(f"teacher {path}: a single-file teacher must be .safetensors")
    sd = original_to_diffusers(read_original_checkpoint(path, meta=meta))
    inferred = infer_config(sd)
    config = load_flux_config(cfg.config) if cfg.config else inferred
    # whether the model embeds guidance is in the tensors (guidance_in); a config may leave it out
    config.setdefault("guidance_embeds", inferred["guidance_embeds"])
    model = build_flux(config, dtype=dtype, meta=True)
    if meta:
        return model
    try:
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise TeacherLoadError(f"teacher {path}: checkpoint does not match its FLUX config ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise TeacherLoadError(f"teacher {path}: checkpoint does not match its FLUX config ({what}, ...)")
    return model


# ----------------------------------------------------------------------------- calling the model


@dataclass
class FluxInputs:
    """One model call's inputs, already packed (diffusers' FLUX convention)."""

    hidden_states: torch.Tensor  # [B, N_img, in_channels] packed latents (noisy)
    encoder_hidden_states: torch.Tensor  # [B, N_txt, joint_attention_dim]
    pooled_projections: torch.Tensor  # [B, pooled_projection_dim]
    timestep: torch.Tensor  # [B] in [0, 1]
    img_ids: torch.Tensor  # [N_img, 3]
    txt_ids: torch.Tensor  # [N_txt, 3]
    guidance: Optional[torch.Tensor] = None  # [B] when the model embeds guidance

    def to(self, device=None, dtype=None) -> "FluxInputs":
        def mv(t, float_cast=True):
            if t is None:
                return None
            if dtype is not None and float_cast and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device) if device is not None else t

        return FluxInputs(
            mv(self.hidden_states), mv(self.encoder_hidden_states), mv(self.pooled_projections),
            mv(self.timestep, False), mv(self.img_ids, False), mv(self.txt_ids, False), mv(self.guidance, False),
        )

    def select(self, index: torch.Tensor) -> "FluxInputs":
        """The sub-batch of samples ``index``."""
        return FluxInputs(
            self.hidden_states[index], self.encoder_hidden_states[index], self.pooled_projections[index],
            self.timestep[index], self.img_ids, self.txt_ids,
            None if self.guidance is None else self.guidance[index],
        )


def embeds_guidance(model: torch.nn.Module) -> Optional[bool]:
    """Whether a FLUX model (or an engine wrapping one) has a guidance embedding; None if unknown.

    FLUX.1 [dev] is guidance-distilled and embeds a guidance value; FLUX.1 [schnell] and
    models trained without guidance distillation have no such input.
    """
    config = getattr(getattr(model, "module", model), "config", None)
    value = getattr(config, "guidance_embeds", None)
    return None if value is None else bool(value)


def call_flux(model: torch.nn.Module, inputs: FluxInputs) -> torch.Tensor:
    """The velocity prediction [B, N_img, out_channels].

    ``inputs.guidance`` reaches the model only if it has a guidance embedding, so one batch
    can feed a teacher of either kind; a model that embeds guidance must be given a value.
    """
    guidance = inputs.guidance
    embeds = embeds_guidance(model)
    if embeds is False:
        guidance = None
    elif embeds and guidance is None:
        raise ValueError("this FLUX model has a guidance embedding: its inputs need a guidance value")
    return model(
        hidden_states=inputs.hidden_states,
        encoder_hidden_states=inputs.encoder_hidden_states,
        pooled_projections=inputs.pooled_projections,
        timestep=inputs.timestep,
        img_ids=inputs.img_ids,
        txt_ids=inputs.txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """Position ids of a packed latent grid of ``height x width`` tokens (diffusers' layout)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], FLUX's 2x2 patch packing."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height x width``."""
    b, _, c4 = packed.shape
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)
