"""``d2m bench export`` on a small FLUX config: the checkpoint it writes is a real one, the rows add up."""

from __future__ import annotations

import json

import torch

from d2m_dist.bench import export as bench_export
from d2m_dist.ckpt.export import export, inspect
from d2m_dist.models.portable import read_state_dict

CFG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4, "num_layers": 2,
       "num_single_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
       "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}


def test_the_benchmark_checkpoint_exports_to_its_init_plus_trained_tensors(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text(json.dumps(CFG))
    root = tmp_path / "bench"
    root.mkdir()
    counts = bench_export.write_stage2_checkpoint(root, str(tmp_path / "teacher"), "1S4E2A")
    info = inspect(root / "stage2")
    assert info["layout"] == {"world_size": 2, "ep_size": 2, "zero_stage": 2}
    assert info["student_tensors"] == counts["tensors"] and 0 < info["trained_tensors"] == counts["trained"]
    out = export(root / "stage2", tmp_path / "student")
    got, init = read_state_dict(out), read_state_dict(root / "init")
    assert got.keys() == init.keys() and len(got) == counts["tensors"]
    frozen = [k for k in got if ".experts." not in k and ".router." not in k]
    assert frozen and all(torch.equal(got[k], init[k]) for k in frozen)  # frozen: copied from the init folder
    trained = [k for k in got if k not in frozen]
    assert trained and not any(torch.equal(got[k], init[k]) for k in trained)  # trained: from the fragments


def test_the_rows(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    rows = bench_export.run(teacher=str(tmp_path), spec="1S4E2A", workdir=str(tmp_path))
    assert [r["what"] for r in rows] == ["inspect (baseline: imports, headers)", "export", "export --optimizer"]
    base, plain, opt = (float(r["peak RSS MB"]) for r in rows)
    assert base > 0 and plain >= base and opt >= base
    assert float(rows[2]["written GB"]) > float(rows[1]["written GB"])  # masters and moments too
