"""Frozen encoders of the precompute job: images -> latents, captions -> text embeddings.

An encoder turns one bucket-batch of the raw stream (uint8 ``[B, H, W, 3]``
images plus captions) into float32 CPU tensors: latents ``[B, C, h, w]``
(unpacked; the trainer packs them), per-token embeddings ``[B, T, D]`` and a
pooled embedding ``[B, D]``. The kind is chosen by ``encoder:`` in the config;
``flux`` is built in and presets add theirs with :func:`register_encoder`:

* ``flux``: a local FLUX pipeline folder. VAE latents ``(z - shift) * scale``
  with both factors from the VAE config (what FluxPipeline inverts before
  decoding), T5 token embeddings and the CLIP pooled output, tokenised exactly
  as ``FluxPipeline._get_t5_prompt_embeds`` / ``_get_clip_prompt_embeds`` do.
* ``digits`` (:mod:`d2m_dist.digits.encoder`): no VAE; the "latent" is the 8x8
  image itself, one channel in [-1, 1], and text comes from the offline MiniLM
  package.

:class:`EncoderSpec` holds what can be checked without loading any weights
(folders exist, bucket sides fit the VAE's downsampling), so a bad setting fails
on every rank before any work; :meth:`EncoderSpec.build` loads the models, which
only ranks with shards left to encode pay for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from d2m_dist.data.buckets import check_buckets as check_bucket_list
from d2m_dist.data.errors import DataError
from d2m_dist.models.sampling import uint8_to_unit

# compute dtypes of the encoder weights (config spelling as in TeacherConfig.dtype)
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLUX_SUBFOLDERS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class Encoder:
    """Interface: ``encode`` one batch; see the module docstring for shapes."""

    def encode(
        self, images: torch.Tensor, captions: List[str], generator: Optional[torch.Generator]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class EncoderSpec:
    """A resolved, validated encoder choice; cheap to make, :meth:`build` loads the weights."""

    kind: str
    buckets: List[Tuple[int, int]]
    max_tokens: int
    # everything an output shard's content depends on; stored with each shard so
    # that a resumed run never mixes shards made with different settings
    settings: Dict[str, Any]
    factory: Callable[[torch.device], Encoder] = field(repr=False)

    def build(self, device: torch.device) -> Encoder:
        return self.factory(device)


def luma(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> uint8 ``[B, H, W]``, bit-identical to PIL's ``convert("L")``.

    The raw stream always delivers RGB; a grey source (the digits PNGs) comes back
    unchanged, and a colour one is reduced exactly as PIL would have.
    """
    x = images.to(torch.int64)
    y = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
    return y.to(torch.uint8)


# ----------------------------------------------------------------------------- flux


class FluxEncoder(Encoder):
    """FLUX's frozen VAE, T5 and CLIP from a local diffusers pipeline folder."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, max_tokens: int, sampling: str):
        # lazy: transformers' text models load in seconds; precompute with another encoder never needs them
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        self.device, self.max_tokens, self.sampling = device, max_tokens, sampling
        self.vae = _load(AutoencoderKL, root / "vae", torch_dtype=dtype).to(device).eval()
        self.t5 = _load(T5EncoderModel, root / "text_encoder_2", dtype=dtype).to(device).eval()
        self.clip = _load(CLIPTextModel, root / "text_encoder", dtype=dtype).to(device).eval()
        self.t5_tokenizer = _load(AutoTokenizer, root / "tokenizer_2")
        self.clip_tokenizer = _load(AutoTokenizer, root / "tokenizer")
        cfg = self.vae.config
        self.shift = float(cfg.shift_factor or 0.0)  # None for VAEs without a shift (SD-style)
        self.scale = float(cfg.scaling_factor)

    @torch.inference_mode()
    def encode(self, images, captions, generator):
        # uint8 crosses to the device (a quarter of the float bytes), then scales to [-1, 1]
        x = uint8_to_unit(images.to(self.device).permute(0, 3, 1, 2)).to(self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(generator) if self.sampling == "sample" else dist.mode()
        latents = (z.float() - self.shift) * self.scale
        # As FluxPipeline: T5 padded to max_length without an attention mask, its
        # last hidden state per token; CLIP padded to its model_max_length (77),
        # pooler_output (the EOS token's state after the final layer norm).
        t5_ids = self.t5_tokenizer(captions, padding="max_length", max_length=self.max_tokens, truncation=True,
                                   return_tensors="pt").input_ids
        clip_ids = self.clip_tokenizer(captions, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
        embeds = self.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        pooled = self.clip(clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return latents.cpu(), embeds.float().cpu(), pooled.float().cpu()


def _load(cls, folder: Path, **kwargs):
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError) as exn:
        first = str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__
        raise DataError(f"cannot load {cls.__name__} from {folder}: {first}") from None


def _flux_spec(model_path: Optional[str], buckets, max_tokens: Optional[int], compute_dtype: str,
               sampling: str) -> EncoderSpec:
    if not model_path:
        raise DataError("encoder 'flux' needs model_path: a local FLUX pipeline folder")
    root = Path(model_path)
    if not root.is_dir():
        raise DataError(f"FLUX model folder {root} does not exist")
    missing = [s for s in FLUX_SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise DataError(f"FLUX model folder {root} has no {', '.join(m + '/' for m in missing)} "
                        f"(needs {', '.join(s + '/' for s in FLUX_SUBFOLDERS)})")
    vae_config = _read_json(root / "vae" / "config.json")
    # the VAE halves the image per level after the first, and FLUX then packs 2x2
    # latents into a token: image sides must be multiples of twice the VAE factor
    multiple = 2 * 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    resolved = check_buckets(buckets if buckets is not None else [[1024, 1024]], multiple,
                              "the VAE's downsampling times 2x2 latent packing")
    tokens = 512 if max_tokens is None else max_tokens  # FluxPipeline's max_sequence_length
    settings = {"encoder": "flux", "model_path": os.path.abspath(root), "max_tokens": tokens,
                "buckets": [list(b) for b in resolved], "compute_dtype": compute_dtype, "latent_sampling": sampling}
    return EncoderSpec("flux", resolved, tokens, settings,
                       lambda device: FluxEncoder(root, device, COMPUTE_DTYPES[compute_dtype], tokens, sampling))


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"{path} is missing or unreadable: {exn}") from None


def check_buckets(buckets, multiple: int, why: str) -> List[Tuple[int, int]]:
    resolved = check_bucket_list(buckets)
    bad = [list(b) for b in resolved if b[0] % multiple or b[1] % multiple]
    if bad:
        raise DataError(f"bucket sides must be multiples of {multiple} ({why}); not so: {bad}")
    return resolved


# ----------------------------------------------------------------------------- registry

SpecFactory = Callable[[Optional[str], Any, Optional[int], str, str], EncoderSpec]
_ENCODERS: Dict[str, SpecFactory] = {"flux": _flux_spec}  # presets register theirs (digits: d2m_dist.digits)


def register_encoder(kind: str, factory: SpecFactory) -> None:
    """Make ``kind`` usable as ``PrecomputeConfig.encoder``.

    ``factory(model_path, buckets, max_tokens, compute_dtype, latent_sampling)``
    validates and returns an :class:`EncoderSpec` without loading weights.
    """
    _ENCODERS[kind] = factory


def encoder_spec(kind: str, model_path: Optional[str], buckets, max_tokens: Optional[int],
                 compute_dtype: str = "fp32", latent_sampling: str = "mode") -> EncoderSpec:
    if kind not in _ENCODERS:
        raise DataError(f"encoder {kind!r} is not one of {sorted(_ENCODERS)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise DataError(f"compute_dtype {compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}")
    if latent_sampling not in ("mode", "sample"):
        raise DataError(f"latent_sampling {latent_sampling!r} is not 'mode' or 'sample'")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"max_tokens must be >= 1, got {max_tokens}")
    return _ENCODERS[kind](model_path, buckets, max_tokens, compute_dtype, latent_sampling)
