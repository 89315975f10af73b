"""The stage recipes, and what each stage does to a real student under the trainer.

Stage 3 (Mixture of Blocks) on 1 and 2 ranks with ep_size 1 and 2: blocks that no
sample of a rank chose are skipped there and run elsewhere, so these runs check
that the ranks' collectives still match, that N ranks equal one, that frozen
weights (expert shards included) are bitwise untouched, and that the loss is the
recipe's. Stages 1-2 keep Mixture-of-Blocks groups built at stage 0 dense, and
every stage honours per-site top-k.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

import d2m_dist.digits  # noqa: F401  (in-process workers train on the digits preset: it must be registered there too)
from d2m_dist.config import ConfigError, StageConfig
from d2m_dist.distill.stages import RECIPES, stage_recipe
from d2m_dist.models.portable import read_state_dict
from tests.distill.launch import changed_outside, launch, stage_config, summary

# ----------------------------------------------------------------------------- the recipe table


def _cfg(stage, **kw):
    cfg = StageConfig(stage=stage, run_dir="r", init="i")
    for k, v in kw.items():
        obj = cfg
        *path, last = k.split("__")
        for p in path:
            obj = getattr(obj, p)
        setattr(obj, last, v)
    return cfg


def test_recipes_follow_the_method():
    r1, r2, r3 = (stage_recipe(_cfg(s)) for s in (1, 2, 3))
    assert (r1.trainable, r1.top_k, r1.zero_stage, r1.mob) == (("shared",), 0, 3, False)
    assert (r2.trainable, r2.top_k, r2.zero_stage, r2.mob) == (("experts", "routers"), None, 2, False)
    assert (r3.trainable, r3.top_k, r3.zero_stage, r3.mob) == (("mob_routers",), None, 2, True)
    # stage 3 trains on the group feature loss alone (docs/METHOD.md, section 3)
    assert (r3.losses.output, r3.losses.feature, r3.losses.balance, r3.losses.group) == (0.0, 0.0, 0.0, 1.0)
    assert (r2.losses.output, r2.losses.feature, r2.losses.balance, r2.losses.group) == (1.0, 1.0, 1e-2, 0.0)
    assert r1.losses.balance == 0.0 and r1.losses.group == 0.0


def test_config_overrides_one_field_at_a_time():
    r = stage_recipe(_cfg(3, loss__output=0.5, top_k=1, trainable=["mob_routers", "routers"]))
    assert (r.losses.output, r.losses.group, r.top_k, r.trainable) == (0.5, 1.0, 1, ("mob_routers", "routers"))
    assert RECIPES[3].losses.output == 0.0  # the table itself is untouched
    assert stage_recipe(_cfg(1, parallel__zero_stage=2)).zero_stage == 2


@pytest.mark.parametrize("kw, message", [
    ({"trainable": ["bogus"]}, "not one of"),
    ({"loss__balance": -1.0}, "loss.balance must be >= 0"),
    ({"parallel__zero_stage": 0}, "is not 1, 2 or 3"),
    ({"parallel__ep_size": 2}, "needs ZeRO stage 1 or 2"),  # stage 1 runs ZeRO-3
])
def test_bad_overrides_are_one_line_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        stage_recipe(_cfg(1, **kw))


# ----------------------------------------------------------------------------- students for the runs below


def _convert(teacher, out, **moe):
    from d2m_dist.config import CalibrationConfig, ConvertConfig, MoEConfig, TeacherConfig
    from d2m_dist.convert.pipeline import run_convert

    cfg = ConvertConfig(teacher=TeacherConfig(path=str(teacher)), moe=MoEConfig(**moe),
                        calibration=CalibrationConfig(source="digits", num_batches=2, batch_size=16), output=str(out))
    return run_convert(cfg)


@pytest.fixture(scope="module")
def z_student(digits_teacher, tmp_path_factory):
    """The digits student with a router z-loss (a term every MoE forward produces)."""
    return _convert(digits_teacher, tmp_path_factory.mktemp("z") / "student", spec="1S4E2A", z_loss_coeff=1e-3)


def _in_group(name: str) -> str:
    """The name a single-stream block's tensor takes inside the digits stage-3 group (m = 2 over both blocks)."""
    return re.sub(r"^single_transformer_blocks\.(\d+)\.", r"single_transformer_blocks.0.blocks.\1.", name)


STAGE3 = ("mob:\n  enabled: true\n  single:\n    first: 0\n    last: -1\n    m: 2\n    kappa: 1")


def _stage3(tmp_path, name, teacher, init, nproc, *overrides, trainable="[mob_routers, routers]"):
    d = tmp_path / name
    d.mkdir()
    cfg = stage_config(d, teacher, init, stage=3, steps=4, trainable=trainable, mob=STAGE3[len("mob:"):],
                       optim="\n  lr: 5.0e-2")
    p = launch(cfg, nproc, *overrides, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return summary(d / "run", 3), read_state_dict(d / "run" / "stage3" / "export")


# ----------------------------------------------------------------------------- stage 3


@pytest.mark.multiproc
@pytest.mark.parametrize("trainable", ["[mob_routers, routers]", "[mob_routers, mob_blocks]"])
def test_stage3_two_ranks_ep1_and_ep2_equal_one_rank(tmp_path, digits_teacher, z_student, trainable):
    """2 samples per rank: a group's block is often chosen by no sample of one rank and run on the other.
    Routers training with a z-loss (every MoE forward produces one) or the grouped blocks training
    (gradients that reach a block on one rank only) must not desynchronise the ranks."""
    # the routers take a large rate (they start near uniform); whole blocks would diverge at it
    lr = "optim.lr=5e-2" if trainable == "[mob_routers, routers]" else "optim.lr=1e-3"
    runs = {"n1": _stage3(tmp_path, "n1", digits_teacher, z_student, 1, "data.batch_size=4", lr, trainable=trainable)}
    layouts = [("n2ep1", ["data.batch_size=2", "parallel.ep_size=1", lr])]
    if trainable == "[mob_routers, routers]":  # experts frozen: each rank's shard must survive the engine's set-up
        layouts.append(("n2ep2", ["data.batch_size=2", "parallel.ep_size=2", lr]))
    for name, over in layouts:
        runs[name] = _stage3(tmp_path, name, digits_teacher, z_student, 2, *over, trainable=trainable)
    (s1, w1) = runs["n1"]
    hist = s1["history"]
    # the recipe's loss: the group feature loss (plus the router z-loss when routers train); no output term
    aux = torch.tensor(hist["z"]) if "z" in hist else 0.0
    torch.testing.assert_close(torch.tensor(hist["loss"]), torch.tensor(hist["group"]) + aux, rtol=1e-6, atol=0)
    init = {_in_group(k): v for k, v in read_state_dict(z_student).items()}
    trains = {"[mob_routers, routers]": lambda k: k.endswith("router.weight"),
              "[mob_routers, mob_blocks]": lambda k: ".blocks." in k}[trainable]
    assert changed_outside(init, w1, trains) == []
    assert any(not torch.equal(w1[k], init[k]) for k in init if trains(k))
    for name, (s, w) in runs.items():
        torch.testing.assert_close(torch.tensor(s["history"]["loss"]), torch.tensor(hist["loss"]), rtol=1e-5,
                                   atol=1e-7, msg=name)
        assert changed_outside(init, w, trains) == [], name
        for k in w1:
            torch.testing.assert_close(w[k], w1[k], rtol=0, atol=1e-5, msg=f"{name}: {k}")


def _alternating_blocks_worker(rank, world, teacher, init, run_dir):
    os.environ["LOCAL_SIZE"] = str(world)
    from d2m_dist.config import load_config
    from d2m_dist.distill.trainer import StageTrainer
    from d2m_dist.models.mob import mob_groups

    cfg = load_config(StageConfig, None, [
        "stage=3", f"run_dir={run_dir}", f"init={init}", f"teacher.path={teacher}", "log.wandb=false",
        "log.progress=false", "data.batch_size=2", "steps=4", "trainable=[mob_routers, routers]",
        "mob.enabled=true", "mob.single.m=2", "mob.single.kappa=1"])
    trainer = StageTrainer(cfg)
    (_, group), = mob_groups(trainer.student)
    select, calls = group.select, []

    def alternate(h, c, t):  # every sample on block 0, then every sample on block 1, ...
        active, delta = select(h, c, t)
        calls.append(len(calls) % 2)
        return torch.nn.functional.one_hot(torch.full((h.shape[0],), calls[-1]), 2).bool(), delta

    group.select = alternate
    for _ in range(4):
        values = trainer.train_step()
        assert values is not None
        # only the block that ran contributed: the z-loss of its layer, not last step's of the other
        layer = group.blocks[calls[-1]].mlp
        assert group.blocks[1 - calls[-1]].mlp.stats is None
        want = layer.z_loss_coeff * float(layer.stats.z_sum) / layer.stats.tokens
        others = sum(m.z_loss_coeff * float(m.stats.z_sum) / m.stats.tokens
                     for m in (trainer.student.transformer_blocks[0].ff, trainer.student.transformer_blocks[0].ff_context))
        assert values["z"] == pytest.approx(want + others, rel=1e-5)
        trainer.step += 1


@pytest.mark.multiproc
def test_stage3_layer_skipped_after_it_ran_leaves_no_stale_loss(tmp_path, digits_teacher, z_student):
    """Each step runs one block of the group and skips the other, so every block is skipped right
    after it ran: its MoE layer's routing terms (here the router z-loss) must not carry over."""
    from tests.distributed import run_ranks

    run_ranks(_alternating_blocks_worker, 1, digits_teacher, z_student, tmp_path / "run", timeout=300)


@pytest.mark.multiproc
def test_mob_built_at_stage0_stays_dense_in_stages_1_and_2(tmp_path, digits_teacher):
    """Mixture of Blocks starts in stage 3: groups that conversion already built run every block."""
    from d2m_dist.config import CalibrationConfig, ConvertConfig, MoBConfig, MoBGroupConfig, MoEConfig, TeacherConfig
    from d2m_dist.convert.pipeline import run_convert

    student = run_convert(ConvertConfig(
        teacher=TeacherConfig(path=str(digits_teacher)), moe=MoEConfig(spec="1S4E2A"),
        mob=MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)),
        calibration=CalibrationConfig(source="digits", num_batches=1, batch_size=8), output=str(tmp_path / "s0")))
    d = tmp_path / "stage1"
    d.mkdir()
    p = launch(stage_config(d, digits_teacher, student, stage=1), 1, "steps=2", "data.batch_size=4")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    metrics = [json.loads(line) for line in (d / "run" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if "loss/total" in m]  # training steps (sample-grid lines carry accuracies only)
    assert len(metrics) == 2
    for m in metrics:
        assert [m[f"mob/single_transformer_blocks.0/block{j}"] for j in range(2)] == [1.0, 1.0]


# ----------------------------------------------------------------------------- per-site top-k


def _top_k_worker(rank, world, teacher, init, run_dir):
    os.environ["LOCAL_SIZE"] = str(world)
    from d2m_dist.config import load_config
    from d2m_dist.distill.trainer import StageTrainer
    from d2m_dist.models.moe import moe_layers

    cfg = load_config(StageConfig, None, ["stage=2", f"run_dir={run_dir}", f"init={init}", f"teacher.path={teacher}",
                                          "log.wandb=false", "log.progress=false", "data.batch_size=2"])
    trainer = StageTrainer(cfg)
    assert trainer.train_step() is not None
    seen = {}
    for name, layer in moe_layers(trainer.student):
        tokens = layer.stats.tokens
        seen[name] = int(layer.tokens_per_expert.sum()) // tokens  # assignments per token: the k it trained with
    assert seen == {n: (1 if "single" in n else 2) for n in seen}, seen


@pytest.mark.multiproc
def test_per_site_top_k_holds_in_training_and_sampling(tmp_path, digits_teacher, monkeypatch):
    """Single-stream sites overridden to 1S4E1A keep k = 1 beside the double-stream sites' k = 2."""
    from d2m_dist.cli import main
    from d2m_dist.config import CalibrationConfig, ConvertConfig, MoEConfig, SiteOverride, TeacherConfig
    from d2m_dist.convert.pipeline import run_convert
    from d2m_dist.models.moe import MoEFeedForward
    from tests.distributed import run_ranks

    student = run_convert(ConvertConfig(
        teacher=TeacherConfig(path=str(digits_teacher)),
        moe=MoEConfig(spec="1S4E2A", overrides=[SiteOverride(sites="single.*.mlp", spec="1S4E1A")]),
        calibration=CalibrationConfig(source="digits", num_batches=1, batch_size=8), output=str(tmp_path / "s0")))
    run_ranks(_top_k_worker, 1, digits_teacher, student, tmp_path / "run", timeout=300)

    calls = []
    forward = MoEFeedForward.forward

    def recording(self, x):
        calls.append((self.top_k, self.shape.top_k))
        return forward(self, x)

    monkeypatch.setattr(MoEFeedForward, "forward", recording)
    rc = main(["sample", "--teacher", str(digits_teacher), "--student", str(student), "--out", str(tmp_path / "g.png"),
               "n_per_digit=1", "steps=1"])
    assert rc == 0
    routed = [c for c in calls if c[0] != 0]  # the student row (the shared-experts row runs k = 0)
    assert routed and all(k == spec_k for k, spec_k in routed)
    assert {k for k, _ in routed} == {1, 2}


# ----------------------------------------------------------------------------- a teacher without guidance embedding


@pytest.mark.multiproc
@pytest.mark.slow
def test_teacher_without_guidance_embedding_through_every_stage(tmp_path):
    """FLUX.1 [schnell]'s kind of teacher (no guidance embedding; 2 double + 4 single blocks): conversion,
    stages 1-3, sampling and export all run, and the student keeps the architecture."""
    from d2m_dist.cli import main
    from d2m_dist.digits.card import PretrainConfig
    from d2m_dist.digits.teacher import pretrain, save_teacher
    from d2m_dist.models.portable import load_student

    teacher = tmp_path / "teacher"
    pcfg = PretrainConfig(num_layers=2, num_single_layers=4, guidance_embeds=False, steps=60, batch_size=32,
                          progress=False)
    save_teacher(pretrain(pcfg).ema, teacher, pcfg)
    assert json.loads((teacher / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    init = _convert(teacher, tmp_path / "stage0", spec="1S4E2A")
    for stage, extra in ((1, {}), (2, {}), (3, {"mob": STAGE3[len("mob:"):]})):
        d = tmp_path / f"s{stage}"
        d.mkdir()
        p = launch(stage_config(d, teacher, init, stage=stage, **extra), 1, "steps=2", "data.batch_size=4")
        assert p.returncode == 0, (stage, p.stdout[-3000:] + p.stderr[-3000:])
        init = d / "run" / f"stage{stage}" / "export"
        assert summary(d / "run", stage)["step"] == 2
    student = load_student(init)
    assert student.config.guidance_embeds is False
    rc = main(["sample", "--teacher", str(teacher), "--student", str(init), "--out", str(tmp_path / "g.png"),
               "--json", str(tmp_path / "eval.json"), "n_per_digit=2", "steps=2"])
    assert rc == 0
    assert set(json.loads((tmp_path / "eval.json").read_text())["accuracy"]) == {"teacher", "student", "student_k0"}
    assert Path(tmp_path / "g.png").stat().st_size > 0


# ----------------------------------------------------------------------------- a DigitEval teacher


@pytest.mark.multiproc
def test_a_stage_on_a_digiteval_teacher_trains_on_canvases_and_reports_digiteval(tmp_path, digiteval_teacher,
                                                                                  digiteval_student):
    """data.source=digits follows the teacher's task: 16x16 RGB compositions; the end-of-stage grid is scored by
    DigitEval and lands in the stage summary and the run summary (what the stage cost in quality)."""
    from d2m_dist.distill.report import run_summary

    d = tmp_path / "stage1"
    d.mkdir()
    p = launch(stage_config(d, digiteval_teacher, digiteval_student, stage=1), 1, "steps=2", "data.batch_size=4",
               "data.source=digits", "log.sample_count=6", "log.sample_steps=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = summary(d / "run", stage=1)
    assert got["step"] == 2 and set(got["samples"]) == {"digiteval/teacher", "digiteval/student"}
    assert all(0.0 <= v <= 1.0 for v in got["samples"].values())
    assert run_summary(d / "run")["stages"]["stage1"]["samples"] == got["samples"]
    grid = d / "run" / "stage1" / "samples" / "step_000002.png"
    assert grid.is_file()  # teacher and student rows, a column per category
