"""The student as a diffusers model: :class:`FluxMoETransformer2DModel`.

A subclass of diffusers' ``FluxTransformer2DModel`` whose config holds, beside
FLUX's own keys, what the portable format's ``d2m_config.json`` holds (the MoE
settings, each converted site's spec, the Mixture-of-Blocks settings) and two
inference knobs, ``top_k`` and ``mob_kappa``. Its constructor builds FLUX and
applies the same surgery as :func:`~d2m_dist.models.portable.build_student_skeleton`,
so ``save_pretrained`` / ``from_pretrained`` (safetensors, sharded, ``dtype``,
the meta-device fast path) are diffusers' own, and ``FluxPipeline`` takes it as
its ``transformer`` because it *is* a ``FluxTransformer2DModel``::

    student = FluxMoETransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    pipe = FluxPipeline.from_pretrained(flux_root, transformer=student, dtype=torch.bfloat16)

The portable folder stays the training interchange; :func:`write_diffusers_student`
turns one into a diffusers folder without loading a tensor (the safetensors files
are linked or copied under diffusers' names: the state-dict keys are the same).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import diffusers
import torch
from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config

from d2m_dist.config import ConfigError
from d2m_dist.models.mob import apply_mob, mob_groups
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.portable import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    StudentMeta,
    load_student_weights,
    mob_config_from_dict,
    moe_config_from_dict,
)
from d2m_dist.models.spec import MoESpec
from d2m_dist.models.surgery import convert_to_moe
from d2m_dist.runtime.folders import written_whole

CLASS_NAME = "FluxMoETransformer2DModel"
WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' safetensors file stem
DIFFUSERS_CONFIG = "config.json"


class FluxMoETransformer2DModel(FluxTransformer2DModel):
    """FLUX with MoE feed-forward sites and Mixture-of-Blocks groups (a d2m student)."""

    # routers decide from small logit differences: diffusers loads them in fp32 whatever dtype says
    # (it also makes from_pretrained take the meta-device path: low_cpu_mem_usage=False is refused)
    _keep_in_fp32_modules = ["router"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: Optional[int] = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Tuple[int, int, int] = (16, 56, 56),
        moe: Optional[Dict] = None,
        site_specs: Optional[Dict[str, str]] = None,
        mob: Optional[Dict] = None,
        top_k: Optional[int] = None,
        mob_kappa: Optional[int] = None,
        d2m_extra: Optional[Dict] = None,
    ):
        super().__init__(
            patch_size=patch_size, in_channels=in_channels, out_channels=out_channels, num_layers=num_layers,
            num_single_layers=num_single_layers, attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads, joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim, guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        if not site_specs:
            raise ConfigError(f"{CLASS_NAME}: config has no site_specs (not a converted student)")
        specs = {site: MoESpec.parse(spec) for site, spec in site_specs.items()}
        convert_to_moe(self, specs, moe_config_from_dict(moe or {}))
        apply_mob(self, mob_config_from_dict(mob or {}))
        # each group's own kappa, what mob_kappa=None restores
        self._group_kappa = {name: group.kappa for name, group in mob_groups(self)}
        self._apply_top_k(top_k)
        self._apply_mob_kappa(mob_kappa)

    # -- inference knobs (saved with the config) ------------------------------------

    def set_top_k(self, k: Optional[int]) -> None:
        """k active routed experts per token at every site (0: shared experts alone); None: each site's spec k.

        A site with fewer experts than ``k`` runs all of its own; ``k`` above every site's count is an error.
        """
        self._apply_top_k(k)
        self.register_to_config(top_k=k)

    def set_mob_kappa(self, kappa: Optional[int]) -> None:
        """kappa active blocks per Mixture-of-Blocks group and sample; None: each group's configured kappa."""
        self._apply_mob_kappa(kappa)
        self.register_to_config(mob_kappa=kappa)

    def set_unit_gates(self, on: bool) -> None:
        """Every routed expert and every block on with gate exactly 1: the dense teacher's function at stage 0."""
        for _, layer in moe_layers(self):
            layer.unit_gates = on
        for _, group in mob_groups(self):
            group.unit_gates = on

    def _apply_top_k(self, k: Optional[int]) -> None:
        layers = moe_layers(self)
        most = max(layer.num_experts for _, layer in layers)
        if k is not None and not 0 <= k <= most:
            raise ConfigError(f"top_k={k}: must lie in 0..{most} (the most routed experts of any site)")
        for _, layer in layers:
            layer.set_top_k(None if k is None else min(k, layer.num_experts))

    def _apply_mob_kappa(self, kappa: Optional[int]) -> None:
        groups = mob_groups(self)
        if kappa is not None and not groups:
            raise ConfigError(f"mob_kappa={kappa}: this student has no Mixture-of-Blocks groups")
        for name, group in groups:  # every group checked before any changes
            if kappa is not None and not 1 <= kappa <= group.m:
                raise ConfigError(f"mob_kappa={kappa}: must lie in 1..{group.m} (blocks of group {name})")
        for name, group in groups:
            group.kappa = self._group_kappa[name] if kappa is None else kappa

    # -- from the portable format -----------------------------------------------------

    @classmethod
    def from_portable(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                      dtype: Optional[torch.dtype] = None) -> "FluxMoETransformer2DModel":
        """The student of a portable folder, in this class (routers fp32; eval mode)."""
        folder = Path(folder)
        config = diffusers_config(StudentMeta.read(folder))
        with torch.device("meta"):
            model = cls.from_config(config)
        return load_student_weights(model, folder, device=device, dtype=dtype)


def diffusers_config(meta: StudentMeta) -> Dict:
    """The diffusers ``config.json`` of a portable student's metadata."""
    base = {k: v for k, v in meta.base_model.items() if not k.startswith("_")}
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": diffusers.__version__,
        **base,
        "moe": meta.moe,
        "site_specs": dict(meta.site_specs),
        "mob": meta.mob,
        "top_k": None,
        "mob_kappa": None,
        "d2m_extra": {**meta.extra, "dtype": meta.dtype},
    }


def diffusers_folder(portable: str | Path) -> Path:
    """Where an export writes its diffusers twin: ``<folder>-diffusers`` beside the portable folder."""
    portable = Path(portable)
    return portable.with_name(f"{portable.name}-diffusers")


def is_diffusers_student(folder: str | Path) -> bool:
    f = Path(folder) / DIFFUSERS_CONFIG
    if not f.is_file():
        return False
    try:
        return json.loads(f.read_text()).get("_class_name") == CLASS_NAME
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def write_diffusers_student(student: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """A diffusers folder (``config.json`` + ``diffusion_pytorch_model*.safetensors``) from a portable one.

    No tensor is loaded: each safetensors file is hard-linked (same file system) or
    copied under its diffusers name, and a sharded index is rewritten to those names.
    Written to a temporary folder and renamed into place: a crash leaves nothing half-written.
    """
    student, out = Path(student), Path(out)
    meta = StudentMeta.read(student)
    files = _portable_weight_files(student)
    if out.exists() and not overwrite:
        raise ConfigError(f"output {out} already exists (overwrite replaces it)")
    with written_whole(out) as tmp:
        for src, dst in files.items():
            _link_or_copy(student / src, tmp / dst)
        index = student / "model.safetensors.index.json"
        if index.is_file():
            data = json.loads(index.read_text())
            data["weight_map"] = {k: files[v] for k, v in data["weight_map"].items()}
            (tmp / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(data, indent=2))
        if (student / PROVENANCE_FILE).is_file():  # which dense neurons each expert came from: kept beside
            shutil.copy2(student / PROVENANCE_FILE, tmp / PROVENANCE_FILE)
        (tmp / DIFFUSERS_CONFIG).write_text(json.dumps(diffusers_config(meta), indent=2))
    return out


def _portable_weight_files(folder: Path) -> Dict[str, str]:
    """Portable weight file name -> its diffusers name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {n: WEIGHTS_NAME + n[len("model"):] for n in names}  # model-00001-of-00002.safetensors -> ...
    if (folder / "model.safetensors").is_file():
        return {"model.safetensors": f"{WEIGHTS_NAME}.safetensors"}
    raise ConfigError(f"student {folder}: no model.safetensors weights")


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise ConfigError(f"student weights {src} missing")
    try:
        os.link(src, dst)  # the weights never change once written: sharing the inode is safe and free
    except OSError:
        shutil.copy2(src, dst)


def load_any_student(path: str | Path, *, device: str | torch.device = "cpu",
                     dtype: Optional[torch.dtype] = None) -> FluxMoETransformer2DModel:
    """A student from a diffusers folder of this class or a portable folder, as :class:`FluxMoETransformer2DModel`."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"student not found: {folder}")
    if is_diffusers_student(folder):
        try:
            model = FluxMoETransformer2DModel.from_pretrained(str(folder), dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"student {folder}: {str(exc).strip().splitlines()[0]}") from None
        return model.to(device).eval()
    if (folder / CONFIG_FILE).is_file():
        return FluxMoETransformer2DModel.from_portable(folder, device=device, dtype=dtype)
    raise ConfigError(f"student {folder}: neither a d2m student folder ({CONFIG_FILE}) nor a diffusers "
                      f"{CLASS_NAME} folder")


def student_base_config(path: str | Path) -> Dict:
    """The FLUX architecture (diffusers config keys) a student folder of either kind was converted from."""
    folder = Path(path)
    if is_diffusers_student(folder):
        cfg = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        flux_keys = set(inspect.signature(FluxTransformer2DModel.__init__).parameters) - {"self"}
        return {k: v for k, v in cfg.items() if k in flux_keys}
    return {k: v for k, v in StudentMeta.read(folder).base_model.items() if not k.startswith("_")}
