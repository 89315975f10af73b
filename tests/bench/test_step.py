"""``d2m bench step`` on a small FLUX config (CPU): rows, depth reduction, the estimate's arithmetic."""

from __future__ import annotations

import json

from d2m_dist.bench import step
from d2m_dist.cli import main


def test_reduced_depth_keeps_the_block_mix():
    assert step.reduced_depth({"num_layers": 19, "num_single_layers": 38}) == {"num_layers": 1,
                                                                                 "num_single_layers": 2}
    assert step.reduced_depth({"num_layers": 2, "num_single_layers": 3}) == {"num_layers": 2, "num_single_layers": 3}


def test_step_bench_on_a_small_flux(tmp_path, capsys):
    cfg = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4, "num_layers": 2,
           "num_single_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
           "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rows = step.run(teacher=str(tmp_path), spec="1S4E2A", batch=2, image_tokens=16, text_tokens=8, repeats=2,
                    device="cpu")
    assert [r["depth"] for r in rows] == ["2+4", "1+2", "1+2", "2+4"]
    ms = [float(r["median ms"]) for r in rows]
    assert all(m > 0 for m in ms)
    # the estimate is the full forward scaled by (1 + student / teacher) at the reduced depth
    est = ms[0] * (1 + ms[2] / ms[1])
    assert abs(ms[3] - est) / est < 0.01
    assert main(["bench", "step", f"teacher={tmp_path}", "spec=1S4E2A", "image_tokens=16", "text_tokens=8",
                 "repeats=1", "device=cpu"]) == 0
    assert "full step, estimated" in capsys.readouterr().out
