"""CUDA checks, run by tools/gpu_smoke.sh on a GPU machine; skipped where no GPU is present.

The CPU suite proves the algorithms; these prove the same library code on CUDA
(NCCL process group, pinned-memory offload, bf16 autocast with fp32 routers).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.models.test_moe import make_layer, reference
from tests.tiny import assert_engine_matches_plain, save_tiny_teacher, tiny_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_moe_layer_on_cuda_matches_cpu():
    cpu = make_layer()
    gpu = make_layer().cuda()
    x = torch.randn(4, 9, 16)
    y_cpu = cpu(x)
    y_gpu = gpu(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_cpu, reference(cpu, x), rtol=1e-5, atol=1e-6)
    y_cpu.pow(2).sum().backward()
    y_gpu.pow(2).sum().backward()
    for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert gpu.tokens_per_expert.device.type == "cuda" and gpu.tokens_per_expert.sum() == 4 * 9 * 2


def test_router_stays_fp32_under_bf16_autocast():
    layer = make_layer().cuda()
    x = torch.randn(64, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, routing_map, logits = layer.route(x)
        y = layer(x)
    assert logits.dtype == torch.float32
    _, ref_map, ref_logits = layer.route(x)
    torch.testing.assert_close(logits, ref_logits)  # fp32 inside autocast: the same logits exactly
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(y.float(), layer(x), rtol=5e-2, atol=5e-2)


def test_zero3_offloaded_teacher_on_cuda_equals_plain(tmp_path):
    """NCCL world of one; the teacher's weights offloaded to pinned CPU memory, gathered per block."""
    from d2m_dist.config import TeacherConfig
    from d2m_dist.distill.teacher import FrozenTeacher
    from d2m_dist.models.flux import load_teacher
    from d2m_dist.parallel.dist import init_distributed

    os.environ.pop("RANK", None)
    save_tiny_teacher(tmp_path / "t")
    info = init_distributed("cuda")
    cfg = TeacherConfig(path=str(tmp_path / "t"), placement="offload")
    plain = load_teacher(cfg).cuda()
    engine = FrozenTeacher(cfg, info.device).engine
    x = tiny_inputs(seed=0).to("cuda")
    assert_engine_matches_plain(plain, engine, x)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="the grouped kernel is one CUTLASS kernel on sm90+")
def test_grouped_experts_in_bf16_match_the_loop_without_a_host_sync():
    from d2m_dist.models.moe import MoEFeedForward
    from d2m_dist.models.spec import MoESpec

    torch.manual_seed(0)
    layer = MoEFeedForward(MoESpec.parse("1S12E2A").resolve(256, 1024)).cuda()
    x = torch.randn(512, 256, device="cuda")
    outs = []
    for kernel in ("grouped", "loop"):
        layer.experts.set_kernel(kernel)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().pow(2).mean().backward()
        outs.append((y.float(), xi.grad, layer.experts.w1.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # dropless routing, local dispatch and the grouped kernel: no device-to-host copy in the forward
    layer.experts.set_kernel("auto")
    assert layer.experts.resolved_kernel(x.bfloat16()) == "grouped"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_generate_runs_the_exported_student_in_bf16_through_flux_pipeline(tmp_path):
    """`d2m generate`'s GPU path: FluxPipeline in bf16 with the student (routers fp32), near the CPU fp32 images."""
    import json

    import numpy as np
    from PIL import Image

    from d2m_dist.config import MoBConfig, MoBGroupConfig
    from d2m_dist.eval.generate import GenerateRequest, run_generate
    from tests.eval.test_generate import _convert
    from tests.tiny import save_tiny_flux_pipeline, tiny_flux

    pipeline = save_tiny_flux_pipeline(tmp_path / "pipeline", tiny_flux(0))
    student = _convert(pipeline, tmp_path / "student", mob=MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    outs = {}
    for device in ("cuda", "cpu"):
        req = GenerateRequest(student=str(student), pipeline=str(pipeline), prompts=["a red cat", "a blue dog"],
                              out=str(tmp_path / device), steps=4, height=64, width=64, teacher_too=True)
        outs[device] = run_generate(req, torch.device(device))
    assert outs["cuda"]["dtype"] == "bf16" and outs["cpu"]["dtype"] == "fp32"
    for a, b in zip(outs["cuda"]["images"], outs["cpu"]["images"]):
        for name in ("teacher", "student"):
            x, y = (np.asarray(Image.open(tmp_path / d / r["files"][name])).astype(float)
                    for d, r in (("cuda", a), ("cpu", b)))
            assert np.abs(x - y).mean() < 6, name  # bf16 rounding, not another image
    print(json.dumps({k: v for k, v in outs["cuda"].items() if k.endswith("_median_s")}))
