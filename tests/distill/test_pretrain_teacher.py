import json
import time

import pytest
import torch

from d2m_dist.config import TeacherConfig
from d2m_dist.distill.pretrain_teacher import (PretrainConfig, count_parameters, digits_training_set,
                                               evaluate_teacher, load_pretrain_config, pretrain, pretrain_teacher,
                                               sample_batch, save_teacher)
from d2m_dist.models.flow import noised_inputs
from d2m_dist.models.flux import call_flux, load_teacher

QUICK = dict(steps=80, batch_size=32, warmup_steps=10, progress=False)


@pytest.fixture(scope="module")
def quick_run():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = PretrainConfig(**QUICK)
    return cfg, pretrain(cfg)


def test_loss_falls(quick_run):
    _, result = quick_run
    assert len(result.losses) == QUICK["steps"]
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_saved_teacher_loads_and_matches_the_ema(quick_run, tmp_path):
    cfg, result = quick_run
    save_teacher(result.ema, tmp_path / "teacher", cfg, extra={"note": "test"})
    assert json.loads((tmp_path / "teacher" / "model_index.json").read_text())["transformer"][1] == \
        "FluxTransformer2DModel"
    loaded = load_teacher(TeacherConfig(path=str(tmp_path / "teacher")))
    assert loaded.config.in_channels == 4 and loaded.config.joint_attention_dim == 384
    assert count_parameters(loaded) == count_parameters(result.ema)
    assert load_pretrain_config(tmp_path / "teacher") == cfg

    gen = torch.Generator().manual_seed(7)
    inputs, _ = noised_inputs(sample_batch(digits_training_set(cfg.max_tokens), cfg, gen), gen)
    with torch.no_grad():
        assert torch.equal(call_flux(loaded, inputs), call_flux(result.ema, inputs))
        # the EMA is its own set of weights, not the last step's
        assert not torch.equal(call_flux(result.model, inputs), call_flux(result.ema, inputs))


def test_training_is_deterministic_given_the_seed():
    cfg = PretrainConfig(**{**QUICK, "steps": 3})
    a, b = pretrain(cfg), pretrain(cfg)
    assert a.losses == b.losses
    assert all(torch.equal(p, q) for p, q in zip(a.ema.parameters(), b.ema.parameters()))


def test_evaluate_runs_on_any_model(quick_run):
    _, result = quick_run
    acc = evaluate_teacher(result.ema, n_per_digit=2, guidance_scale=2.0, steps=2)
    assert 0.0 <= acc <= 1.0
    assert result.model.training  # evaluation leaves the mode as it found it
    evaluate_teacher(result.model, n_per_digit=1, steps=1)
    assert result.model.training


def test_config_is_checked():
    with pytest.raises(ValueError, match="sum"):
        PretrainConfig(axes_dims_rope=[8, 8, 8]).check()
    with pytest.raises(ValueError, match="caption_dropout"):
        PretrainConfig(caption_dropout=1.0).check()


@pytest.mark.slow
def test_default_teacher_reads_as_digits(tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cfg = PretrainConfig(progress=False)
    start = time.perf_counter()
    result, accuracy = pretrain_teacher(cfg, tmp_path / "teacher", eval_per_digit=20, eval_scales=(1.0, 2.0))
    print(f"params={count_parameters(result.ema)} train_s={result.seconds:.1f} "
          f"total_s={time.perf_counter() - start:.1f} accuracy={accuracy}")
    assert accuracy["cfg1"] >= 0.9
    assert accuracy["cfg2"] >= 0.95
    card = json.loads((tmp_path / "teacher" / "d2m_teacher.json").read_text())
    assert card["digit_accuracy"] == accuracy
    assert evaluate_teacher(load_teacher(TeacherConfig(path=str(tmp_path / "teacher"))), 20) == accuracy["cfg1"]
