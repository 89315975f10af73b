"""The planner's bytes per rank against the live DeepSpeed engines of the trainer, on 2 CPU ranks.

Parameters, gradients, optimizer state, the gradient staging buckets and the teacher: equal, to the
byte. Activations (an estimate from a traced twin): within 25% of what the real step's autograd kept.
"""

from __future__ import annotations

import json

import pytest
import torch

import d2m_dist.digits  # noqa: F401  (registers the digits batches, also in spawned ranks)
from d2m_dist.plan.inventory import plan_inputs
from d2m_dist.plan.memory import student_state, teacher_state
from tests.distributed import run_ranks

LAYOUTS = [  # (stage, ep, ZeRO stage, teacher placement): stage 1's ZeRO-3 with frozen experts, stage 2 on
    (1, 1, 3, "resident"),  # ZeRO-2 with and without EP and on ZeRO-3 with training experts
    (2, 1, 2, "sharded"),
    (2, 2, 2, "offload"),
    (2, 1, 3, "resident"),
]


def _configs(tmp_path, teacher, student, stage, ep, zero, placement):
    (tmp_path / "stage0.yaml").write_text(f"teacher:\n  path: {teacher}\nmoe:\n  spec: 1S4E2A\noutput: unused\n")
    f = tmp_path / f"stage{stage}.yaml"
    f.write_text(f"stage: {stage}\nrun_dir: {tmp_path / 'run'}\ninit: {student}\nteacher:\n  path: {teacher}\n"
                 f"  placement: {placement}\nparallel:\n  ep_size: {ep}\n  zero_stage: {zero}\ndata:\n"
                 "  batch_size: 4\nlog:\n  wandb: false\n  progress: false\n  fixed_batches: 0\nckpt:\n  every: 0\n")
    return f


def _measure_on_ranks(rank, world, configs, out):
    """Every layout's trainer in turn in the same two processes (one spawn, one DeepSpeed import)."""
    from d2m_dist.config import StageConfig, load_config
    from d2m_dist.distill.trainer import StageTrainer
    from d2m_dist.parallel.deepspeed_setup import measured_state

    for n, config in enumerate(configs):
        trainer = StageTrainer(load_config(StageConfig, config))
        engine, before, after, staging = trainer.engine, {}, {}, {}
        step, opt = engine.step, engine.optimizer

        def measured_step(*args, **kwargs):
            before.update(measured_state(engine))  # the gradients: from the backward to the update
            result = step(*args, **kwargs)
            after.update(measured_state(engine))  # weights and optimizer state, Adam's moments made by now
            return result

        engine.step = measured_step
        if hasattr(opt, "_release_ipg_buffers"):  # ZeRO-1/2 frees its staging buckets at the backward's end
            release = opt._release_ipg_buffers

            def measured_release():
                staging["comm_buffers"] = sum(b.numel() * b.element_size() for bucket in opt.ipg_buckets.values()
                                              for b in bucket.buffer)
                release()

            opt._release_ipg_buffers = measured_release
        params = {p.untyped_storage().data_ptr() for m in (trainer.student, trainer.teacher.module)
                  for p in m.parameters()}
        saved: dict = {}

        def pack(t):  # what autograd keeps for the backward: each storage once, weights left out
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.train_step()
        state = {"activations": sum(saved.values()), **{k: v for k, v in after.items() if k.startswith(("params", "optimizer"))},
                 **{k: v for k, v in before.items() if k.startswith(("grads", "comm"))}, **staging}
        module = trainer.teacher.module
        state["teacher"] = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in module.parameters())
        (out / f"layout{n}-rank{rank}.json").write_text(json.dumps(state))
        if trainer.run_lock is not None:
            trainer.run_lock.release()


@pytest.mark.multiproc
def test_planned_bytes_equal_the_engines(tmp_path, digits_teacher, digits_student):
    configs = []
    for n, (stage, ep, zero, placement) in enumerate(LAYOUTS):
        (tmp_path / str(n)).mkdir()
        configs.append(_configs(tmp_path / str(n), digits_teacher, digits_student, stage, ep, zero, placement))
    run_ranks(_measure_on_ranks, 2, configs, tmp_path)
    for n, ((stage, ep, zero, placement), config) in enumerate(zip(LAYOUTS, configs)):
        planned = plan_inputs(str(config), stage)
        assert planned.recipe.zero_stage == zero
        teacher = teacher_state(planned.teacher_numels(), 2, placement, 4)  # fp32 on CPU
        for rank in range(2):
            got = json.loads((tmp_path / f"layout{n}-rank{rank}.json").read_text())
            want = student_state(planned.params(ep), 2, ep, zero, rank, bf16=False).as_dict()  # CPU: fp32
            for key in want:
                assert got[key] == want[key], (LAYOUTS[n], rank, key, got[key], want[key])
            if zero != 3:  # the storages the gradient slices point into: the whole parameters of its share
                assert got["grads_storage"] == want["grads"]
            assert got["teacher"] == teacher.device + teacher.host  # on CPU both live in the same memory
        # activations: the twin's estimate against what the real step's autograd kept, the ranks' mean (under
        # expert parallelism a rank's experts meet as many rows as the router sends them: the mean is balanced)
        got = sum(json.loads((tmp_path / f"layout{n}-rank{r}.json").read_text())["activations"] for r in range(2)) / 2
        est = planned.activations(16, 8, 4, ep, bf16=False)["without_ckpt"]  # 8x8 digits: 16 + 8 tokens; fp32
        assert est["weight_copies"] == 0
        assert abs(sum(est.values()) - got) <= 0.25 * got, (LAYOUTS[n], est, got)
        if stage == 2:  # the experts train: their share of the optimizer state is checked, not only zero
            assert got_state(tmp_path, n)["optimizer_experts"] > 0
    # measured: expert parallelism halves the expert weights a rank holds (stage 2 at ep 1, then 2)
    ep1, ep2 = (json.loads((tmp_path / f"layout{n}-rank0.json").read_text())["params_experts"] for n in (1, 2))
    assert ep1 == 2 * ep2 > 0


def got_state(tmp_path, n, rank=0):
    return json.loads((tmp_path / f"layout{n}-rank{rank}.json").read_text())
