"""``d2m bench step`` on a small FLUX config (CPU): rows, depth reduction, the estimate's arithmetic,
and the FLOPs it reports against a hand count of every matrix product. No timed assertions."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from d2m_dist.bench import step
from d2m_dist.cli import main
from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig, StageConfig, load_config, to_dict
from d2m_dist.models.moe import moe_layers

REPO = Path(__file__).resolve().parents[2]
CFG = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 4, "num_layers": 2,
       "num_single_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
       "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
D, C, J, P = 32, 4, 32, 32  # width (2 heads x 16), latent channels, text width, pooled width
SHARED, WIDTH, N, K = 32, 24, 4, 2  # 1S4E2A on a 4D = 128 wide FFN: shared 1 x D, 4 experts of (128 - 32) / 4


def hand_flops(nd: int, ns: int, b: int, li: int, lt: int, moe: bool = False, mob: tuple = (0, 0)) -> int:
    """Forward FLOPs (2 per multiply-add) of every matrix product and attention of the small FLUX.

    ``moe``: 1S4E2A on every FFN site. ``mob``: (double, single) Mixture-of-Blocks groups
    of m = 2, kappa = 1: each sample skips one block of every group, and every group
    adds its router.
    """
    lin = lambda rows, i, o: 2 * rows * i * o  # noqa: E731
    seq = li + lt  # joint attention sequence
    embed = (lin(b * li, C, D) + lin(b * lt, J, D)  # x_embedder, context_embedder
             + 2 * (lin(b, 256, D) + lin(b, D, D))  # timestep and guidance MLPs (256 sinusoidal features)
             + lin(b, P, D) + lin(b, D, D))  # pooled text projection
    attention = 4 * b * seq * seq * D  # QK^T and AV over all heads
    # per token and FFN site: dense D -> 4D -> D, or shared + k experts + router
    ffn = 2 * lin(1, D, SHARED + K * WIDTH) + lin(1, D, N) if moe else 2 * lin(1, D, 4 * D)
    double = (2 * lin(b, D, 6 * D)  # AdaLN-Zero of both streams
              + 4 * lin(b * seq, D, D)  # q, k, v, out of both streams
              + attention + b * seq * ffn)  # ff on the image tokens, ff_context on the text tokens
    single = (lin(b, D, 3 * D) + 3 * lin(b * seq, D, D) + attention
              + lin(b * seq, D, D)  # proj_out's attention columns
              + b * seq * ffn)  # proj_mlp and proj_out's MLP columns (or the MoE layer)
    out = lin(b, D, 2 * D) + lin(b * li, D, C)  # norm_out, proj_out
    router = lin(b, 2 * D, 2) + lin(b, D, 2)  # MoB: W_x on [pool(img), pool(txt)], W_y on temb
    groups_d, groups_s = mob
    return (embed + (nd - groups_d) * double + (ns - groups_s) * single + out
            + (groups_d + groups_s) * router)


def _config_dir(tmp_path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(CFG))
    return tmp_path


def test_reduced_depth_keeps_the_block_mix():
    assert step.reduced_depth({"num_layers": 19, "num_single_layers": 38}) == {"num_layers": 1,
                                                                                 "num_single_layers": 2}
    assert step.reduced_depth({"num_layers": 2, "num_single_layers": 3}) == {"num_layers": 2, "num_single_layers": 3}


def test_moe_s_mob_is_the_preset_and_scales_with_depth():
    fill = ["teacher.path=/teacher", "data.urls=/shards/train-000000.tar"]
    preset = load_config(StageConfig, REPO / "configs/presets/flux-dev-moe-s/stage3.yaml", fill)
    assert to_dict(preset.mob) == to_dict(step.MOE_S_MOB)
    assert to_dict(step.mob_at_depth(step.MOE_S_MOB, 19, 38)) == to_dict(step.MOE_S_MOB)
    # 1+2: 18/19 of one double block is no whole group of 2; 24/38 of two single blocks rounds to one group
    small = step.mob_at_depth(step.MOE_S_MOB, 1, 2)
    assert small.double is None and small.single == MoBGroupConfig(first=0, last=1, m=2, kappa=1)
    assert step.mob_label(small) == "MoB single 1x2 kappa 1"
    assert not step.mob_at_depth(MoBConfig(enabled=True, double=MoBGroupConfig(0, 1, 2, 1)), 1, 2).enabled


def test_flops_match_a_hand_count():
    """model_flops counts exactly the products of the hand count: dense, 1S4E2A (both expert
    kernels, forward and backward alike) and 1S4E2A with Mixture of Blocks."""
    dev = torch.device("cpu")
    b, li, lt = 2, 16, 8
    bench = step._Bench(step.random_inputs(CFG, b, li, lt, dev), dev, False, b, li + lt, 1)
    count = lambda model: step.model_flops(functools.partial(bench.forward, model))  # noqa: E731
    for nd, ns in ((2, 4), (1, 2)):
        cfg = {**CFG, "num_layers": nd, "num_single_layers": ns}
        assert count(step._teacher(cfg, dev, False)) == hand_flops(nd, ns, b, li, lt)
        assert count(step._inference_student(cfg, "1S4E2A", None, dev, False)) == hand_flops(nd, ns, b, li, lt, moe=True)
        # MoE-S's grouping scaled: 2+4 -> double 0-1 and single 0-1 in groups of 2; 1+2 -> single 0-1
        mob = step.mob_at_depth(step.MOE_S_MOB, nd, ns)
        groups = (1, 1) if nd == 2 else (0, 1)
        assert count(step._inference_student(cfg, "1S4E2A", mob, dev, False)) == \
            hand_flops(nd, ns, b, li, lt, moe=True, mob=groups)
    # the grouped expert kernel (torch._grouped_mm, which FlopCounterMode alone does not count) counts as the loop
    cfg = {**CFG, "num_layers": 1, "num_single_layers": 2}
    steps = []
    for kernel in ("loop", "grouped"):
        model = step._student(cfg, "1S4E2A", dev)
        for _, layer in moe_layers(model):
            layer.experts.set_kernel(kernel)
        assert count(model) == hand_flops(1, 2, b, li, lt, moe=True)
        steps.append(step.model_flops(functools.partial(bench.forward_backward, model)))
    assert steps[0] == steps[1] > 2 * hand_flops(1, 2, b, li, lt, moe=True)


def test_step_bench_on_a_small_flux(tmp_path, capsys):
    teacher = _config_dir(tmp_path)
    b, li, lt = 2, 16, 8
    rows = step.run(teacher=str(teacher), spec="1S4E2A", batch=b, image_tokens=li, text_tokens=lt, repeats=2,
                    device="cpu")
    assert all(list(r) == step.COLUMNS for r in rows)
    what = [r["what"] for r in rows]
    assert what == ["teacher forward (a step's lower bound)", "teacher forward",
                    "teacher forward+backward (dense fine-tune)", "student 1S4E2A forward+backward",
                    "full step, estimated", "inference: teacher forward",
                    "inference: student 1S4E2A on every site forward",
                    "inference: student 1S4E2A + MoB single 1x2 kappa 1 forward"]
    assert [r["depth"] for r in rows] == ["2+4", "1+2", "1+2", "1+2", "2+4", "1+2", "1+2", "1+2"]
    by = dict(zip(what, rows))
    ms = {w: float(r["median ms"]) for w, r in by.items()}
    assert all(m > 0 for m in ms.values())
    # the estimate is the full forward scaled by (1 + student / teacher) at the reduced depth
    est = ms[what[0]] * (1 + ms[what[3]] / ms[what[1]])
    assert abs(ms[what[4]] - est) / est < 0.01

    # the ratios: time over the teacher's at the same depth and kind of pass, forward FLOPs by hand
    teacher_small = hand_flops(1, 2, b, li, lt)
    expect = {what[3]: (what[2], hand_flops(1, 2, b, li, lt, moe=True)),
              what[6]: (what[5], hand_flops(1, 2, b, li, lt, moe=True)),
              what[7]: (what[5], hand_flops(1, 2, b, li, lt, moe=True, mob=(0, 1)))}
    for w, (ref, student_flops) in expect.items():
        t = float(by[w]["time vs teacher"])
        assert t > 0 and t == pytest.approx(ms[w] / ms[ref], rel=0.01)
        f = float(by[w]["fwd FLOPs vs teacher"])
        assert 0 < f < 1 and f == pytest.approx(student_flops / teacher_small, abs=0.0015)
    # hand ratios of this config: 0.798 (MoE), 0.546 (MoE + MoB on the two single blocks)
    assert float(by[what[3]]["fwd FLOPs vs teacher"]) == 0.798
    assert float(by[what[7]]["fwd FLOPs vs teacher"]) == 0.546
    # forward rows count their forward, the step rows forward + backward
    for w, flops in ((what[0], hand_flops(2, 4, b, li, lt)), (what[1], teacher_small), (what[5], teacher_small)):
        assert float(by[w]["GFLOPs"]) * 1e9 == pytest.approx(flops, rel=1e-3)
    assert float(by[what[2]]["GFLOPs"]) * 1e9 > 2 * teacher_small
    assert by[what[4]]["GFLOPs"] == by[what[0]]["time vs teacher"] == ""

    assert main(["bench", "step", f"teacher={teacher}", "spec=1S4E2A", "image_tokens=16", "text_tokens=8",
                 "repeats=1", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "full step, estimated" in out and "| time vs teacher | fwd FLOPs vs teacher |" in out
    assert main(["bench", "step", f"teacher={teacher}", "spec=1S4E2A", "image_tokens=16", "text_tokens=8",
                 "repeats=1", "device=cpu", "parts=inference", "depth=full"]) == 0
    out = capsys.readouterr().out
    assert "full step" not in out and "| 2+4 |" in out and "MoB double 1x2 kappa 1, single 1x2 kappa 1" in out


def test_step_bench_settings_are_checked():
    with pytest.raises(ConfigError, match="parts"):
        step.run(parts="train,decode", device="cpu")
    with pytest.raises(ConfigError, match="depth"):
        step.run(depth="half", device="cpu")
