"""The portable student format (a public contract; docs/ARCHITECTURE.md).

A folder holding:

* ``d2m_config.json``: format name and version, the base model's diffusers
  config, the MoE settings and per-site specs, the MoB settings, the list of
  converted sites, the weight dtype;
* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` plus
  ``model.safetensors.index.json`` when sharded): the student's full state dict.
  Routed-expert tensors are stacked with the global expert id as first axis;
* ``provenance.safetensors``: for every converted site, ``<site>.shared`` [Hs]
  and ``<site>.experts`` [n, He], the dense FFN index of each neuron.

Folders are written under a temporary name and renamed into place once
complete, so a crash never leaves a half-written student.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from huggingface_hub import save_torch_state_dict
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from d2m_dist.config import ConfigError, MoBConfig, MoEConfig
from d2m_dist.models.flux import build_flux, parse_dtype
from d2m_dist.models.mob import apply_mob, mob_groups
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.spec import MoESpec
from d2m_dist.models.surgery import SitePartition, convert_to_moe
from d2m_dist.runtime.folders import written_whole

FORMAT = "d2m-student"
VERSION = 1
CONFIG_FILE = "d2m_config.json"
PROVENANCE_FILE = "provenance.safetensors"


@dataclass
class StudentMeta:
    base_model: Dict
    moe: Dict
    site_specs: Dict[str, str]
    mob: Dict
    dtype: str = "fp32"
    extra: Dict = field(default_factory=dict)  # free-form: conversion settings, training step...

    @property
    def sites(self) -> List[str]:
        return list(self.site_specs)

    def to_json(self) -> str:
        d = {"format": FORMAT, "version": VERSION, **asdict(self), "sites": self.sites}
        return json.dumps(d, indent=2, sort_keys=False)

    @classmethod
    def read(cls, folder: Path) -> "StudentMeta":
        f = folder / CONFIG_FILE
        if not f.is_file():
            raise ConfigError(f"student {folder}: no {CONFIG_FILE} (not a d2m student folder)")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"student {f}: invalid JSON ({exc.msg})") from None
        if d.get("format") != FORMAT:
            raise ConfigError(f"student {f}: format {d.get('format')!r} is not {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ConfigError(f"student {f}: format version {d.get('version')} unsupported (this build reads {VERSION})")
        return cls(d["base_model"], d["moe"], d["site_specs"], d["mob"], d.get("dtype", "fp32"), d.get("extra", {}))


def moe_config_from_dict(d: Dict) -> MoEConfig:
    keep = {k: v for k, v in d.items() if k in ("spec", "sites", "renormalize", "z_loss_coeff", "capacity_factor")}
    return MoEConfig(**keep)


def mob_config_from_dict(d: Dict) -> MoBConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MoBConfig), d))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- writing


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The student's state dict with routed experts in global-id order.

    Single-rank models already hold every expert; under expert parallelism the
    caller gathers the expert shards first (see ``ckpt``).
    """
    sd = model.state_dict()
    for name, layer in moe_layers(model):
        if layer.experts.num_local != layer.num_experts:
            raise ValueError(f"{name}: holds experts {list(layer.global_expert_ids)} of {layer.num_experts}; gather first")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def to_storage_dtype(state_dict: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Floating-point weights in the folder's ``dtype``, routers (MoE and MoB) kept in fp32."""
    return {k: v.to(dtype) if v.is_floating_point() and ".router." not in k else v for k, v in state_dict.items()}


def write_student(
    folder: str | Path,
    state_dict: Dict[str, torch.Tensor],
    meta: StudentMeta,
    provenance: Optional[Dict[str, SitePartition]] = None,
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Path:
    """Write a student folder atomically (temp folder, then rename)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ConfigError(f"output {folder} already exists (set overwrite=true to replace it)")
    with written_whole(folder) as tmp:
        save_torch_state_dict(state_dict, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        if provenance:
            prov = {}
            for site, part in provenance.items():
                prov[f"{site}.shared"] = part.shared.to(torch.int64).contiguous()
                prov[f"{site}.experts"] = part.experts.to(torch.int64).contiguous()
            save_file(prov, str(tmp / PROVENANCE_FILE))
        (tmp / CONFIG_FILE).write_text(meta.to_json())
        _fsync_dir(tmp)
    return folder


def _fsync_dir(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- reading


def read_provenance(folder: str | Path) -> Dict[str, SitePartition]:
    f = Path(folder) / PROVENANCE_FILE
    if not f.is_file():
        raise ConfigError(f"student {folder}: no {PROVENANCE_FILE}")
    t = load_file(str(f))
    sites = sorted({k.rsplit(".", 1)[0] for k in t})
    return {s: SitePartition(t[f"{s}.shared"], t[f"{s}.experts"]) for s in sites}


def read_state_dict(folder: str | Path, rows: Optional[Dict[str, slice]] = None) -> Dict[str, torch.Tensor]:
    """The student folder's weights; ``rows``: for these keys read only those rows (first dimension).

    Under expert parallelism each rank asks for its own experts' rows of every stack
    (:func:`expert_rows`) and keeps a copy of those rows only, so no rank holds the
    whole student's experts once loading is done.
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"student {folder}: no model.safetensors weights")
    rows = rows or {}
    sd: Dict[str, torch.Tensor] = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt") as fh:
                for key in fh.keys():
                    # a slice's own copy: a view would keep the whole stack's buffer alive
                    sd[key] = fh.get_slice(key)[rows[key]].clone() if key in rows else fh.get_tensor(key)
        except Exception as exc:
            raise ConfigError(f"student weights {folder / name}: unreadable ({str(exc).splitlines()[0]})") from None
    return sd


def build_student_skeleton(meta: StudentMeta, *, meta_device: bool = True) -> nn.Module:
    """The student's modules with the right shapes and no trained weights."""
    dtype = parse_dtype(meta.dtype)
    model = build_flux(meta.base_model, dtype=dtype, meta=meta_device)
    specs = {site: MoESpec.parse(spec) for site, spec in meta.site_specs.items()}
    convert_to_moe(model, specs, moe_config_from_dict(meta.moe))
    apply_mob(model, mob_config_from_dict(meta.mob))
    return model


def expert_rows(model: nn.Module) -> Dict[str, slice]:
    """The rows of each global expert stack that ``model``'s layers hold (only layers split by EP)."""
    rows: Dict[str, slice] = {}
    for name, layer in moe_layers(model):
        if layer.experts.num_local != layer.num_experts:
            ids = slice(layer.expert_offset, layer.expert_offset + layer.experts.num_local)
            rows.update({f"{name}.experts.{w}": ids for w in ("w1", "b1", "w2")})
    return rows


def local_expert_slices(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Cut the global expert stacks of an in-memory ``sd`` down to the experts ``model`` holds (copies)."""
    return {**sd, **{k: sd[k][ids].clone() for k, ids in expert_rows(model).items()}}


def load_student(path: str | Path, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Rebuild a student from its folder alone (eval mode)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"student not found: {folder}")
    model = build_student_skeleton(StudentMeta.read(folder), meta_device=True)
    return load_student_weights(model, folder, device=device, dtype=dtype)


def load_student_weights(
    model: nn.Module, path: str | Path, *, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
) -> nn.Module:
    """Fill a student skeleton (meta device) from its folder; eval mode.

    Under expert parallelism the skeleton was split first
    (``parallel/expert_parallel.apply_expert_parallel``): each rank keeps only its
    own slice of every expert stack.
    """
    folder = Path(path)
    meta = StudentMeta.read(folder)
    sd = read_state_dict(folder, rows=expert_rows(model))
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ConfigError(f"student {folder}: weights do not match its config ({what})")
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ConfigError(f"student {folder}: no weights for {leftover[:3]}")
    if dtype is not None and dtype != parse_dtype(meta.dtype):
        # cast where the weights are (the CPU), then move: a bf16 student never sits on the GPU in fp32.
        # nn.Module.to, not a diffusers model's own (which warns about its fp32 modules: restored next)
        nn.Module.to(model, dtype=dtype)
        for _, layer in moe_layers(model):  # routers stay fp32 (MoE and MoB alike)
            layer.router.float()
        for _, group in mob_groups(model):
            group.router.float()
    nn.Module.to(model, device=device)
    return model.eval()
