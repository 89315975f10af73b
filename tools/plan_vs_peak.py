"""Planned bytes per GPU of a digits stage beside the peak its real run measured (tools/gpu_smoke.sh).

    python tools/plan_vs_peak.py STAGE_CONFIG TEACHER METRICS_JSONL OUT_JSON

The run is one GPU, ZeRO-3, teacher resident (gpu_smoke's stage 1); its metrics carry
``memory/peak_gb`` (torch.cuda.max_memory_allocated). Prints both and their ratio.
"""

import json
import sys

from d2m_dist.plan.report import PlanRequest, run_plan


def main(config: str, teacher: str, metrics: str, out: str) -> int:
    # 8x8 digits: 16 image tokens (a 64-pixel side at FLUX's 16 pixels per token) and 8 caption tokens
    result = run_plan(PlanRequest(config=config, stage=1, nodes=1, gpus_per_node=1, gpu_mem="80GB", ep=1, zero=3,
                                  teacher="resident", resolution=64, text_tokens=8,
                                  overrides=[f"teacher.path={teacher}"]))
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    planned = result["layouts"][0]["gpu_total"] / 2**30
    peaks = [json.loads(line)["memory/peak_gb"] for line in open(metrics) if "memory/peak_gb" in line]
    if not peaks:
        print(f"planned {planned:.3f} GiB per GPU; the run logged no CUDA peak")
        return 1
    ratio = planned / peaks[-1]
    buckets = result["layouts"][0]["gpu_bytes"]["comm_buffers"] / 2**30
    print(f"planned {planned:.3f} GiB per GPU ({buckets:.3f} GiB of it gradient staging buckets), measured peak "
          f"{peaks[-1]:.3f} GiB: ratio {ratio:.2f} ({'within' if 0.75 <= ratio <= 1.33 else 'OUTSIDE'} 0.75-1.33)")
    return 0 if 0.75 <= ratio <= 1.33 else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
