"""Is a teacher path really FLUX weights, and is it the teacher a student was converted from?

Both questions are answered from safetensors headers and a few rows of tensors,
never by loading the model, so they run in every rank's pre-flight checks
before any engine exists:

* :func:`check_teacher_weights`: the tensor names and shapes in the files equal
  those of the FLUX transformer their config describes. A diffusers folder whose
  ``config.json`` says FLUX but whose weights are something else otherwise loads
  half-empty and fails much later ("Cannot copy out of meta tensor").
* :func:`teacher_fingerprint`: a short hash of the teacher's *values*, recorded
  by ``d2m convert`` in the student's metadata and compared at every stage
  start. A student converted from another teacher of the same architecture
  otherwise trains without a word (the loss starts an order of magnitude high).

The fingerprint hashes rows of four tensors that both checkpoint layouts
(diffusers and the original single file) store unchanged, under their
diffusers names, cast to bf16: the same weights in either layout, sharded or
not, in fp32 or bf16, give the same fingerprint; other weights of the same
architecture give another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from d2m_dist.models.flux import build_flux, resolve_transformer_dir
from d2m_dist.models.flux_config import BUILTIN_CONFIGS, TeacherLoadError, read_safetensors_header

# diffusers name -> original single-file name; all four are plain renames (no split, no reorder)
_FINGERPRINT_TENSORS = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_text_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "proj_out.weight": "final_layer.linear.weight",
}


def teacher_weight_files(path: str | Path) -> Tuple[List[Path], bool]:
    """The safetensors files of a teacher path and whether they are in the original single-file layout."""
    p = Path(path)
    if p.is_file():
        return [p], True
    folder = resolve_transformer_dir(p)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TeacherLoadError(f"teacher {folder}: no .safetensors weights")
    return files, False


def check_teacher_weights(path: str | Path, config: Dict) -> None:
    """One line (TeacherLoadError) unless the files hold exactly the tensors of FLUX with ``config``."""
    if str(path) in BUILTIN_CONFIGS:
        return  # an architecture without weights: nothing to compare
    files, original = teacher_weight_files(path)
    if original:
        return  # the single-file loader maps every key and refuses a mismatch before anything runs
    have: Dict[str, Tuple[int, ...]] = {}
    for f in files:
        have.update({k: tuple(v["shape"]) for k, v in read_safetensors_header(f).items() if k != "__metadata__"})
    want = _flux_shapes(config)
    missing = sorted(set(want) - set(have))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or wrong:
        where = files[0].parent
        if missing:
            example = sorted(set(have) - set(want))[:1]
            seen = f"; the files hold e.g. {example[0]!r}" if example else ""
            raise TeacherLoadError(f"teacher {where}: the weights are not the FLUX transformer its config.json "
                                   f"describes ({len(missing)} of {len(want)} tensors missing, e.g. "
                                   f"{missing[0]!r}{seen})")
        k = wrong[0]
        raise TeacherLoadError(f"teacher {where}: the weights do not match its config.json: {k} is "
                               f"{list(have[k])}, the config makes {list(want[k])} ({len(wrong)} such tensors)")


def teacher_fingerprint(path: str | Path) -> str:
    """16 hex digits identifying the teacher's weights (see the module docstring)."""
    files, original = teacher_weight_files(path)
    where = {}
    for f in files:
        for key in read_safetensors_header(f):
            where[key] = f
    digest = hashlib.sha256()
    for diffusers_name, original_name in _FINGERPRINT_TENSORS.items():
        name = original_name if original else diffusers_name
        if name not in where:
            raise TeacherLoadError(f"teacher {files[0].parent if not original else files[0]}: no tensor {name!r} "
                                   f"(not FLUX weights)")
        with safe_open(str(where[name]), framework="pt") as sf:
            rows = sf.get_slice(name)
            n = rows.get_shape()[0]
            picked = [rows[i : i + 1] for i in sorted({0, n // 3, (2 * n) // 3, n - 1})]
        digest.update(diffusers_name.encode())
        for row in picked:
            digest.update(row.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _flux_shapes(config: Dict) -> Dict[str, Tuple[int, ...]]:
    model = build_flux(config, meta=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
