import json

import pytest
import torch

from d2m_dist.config import TeacherConfig
from d2m_dist.digits.card import ConfigError, PretrainConfig, load_pretrain_config
from d2m_dist.digits.data import digits_training_set, sample_batch
from d2m_dist.digits.evaluate import evaluate_teacher
from d2m_dist.digits.teacher import count_parameters, pretrain, save_teacher
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


class FlowToDigit(torch.nn.Module):
    """A test double with the exact rectified-flow velocity towards one real digit image per prompt.

    For ``x_t = (1 - t) z + t e`` the velocity ``e - z`` is ``(x_t - z) / t``; Euler steps on it land
    exactly on ``z``. ``target(d)`` picks the image the prompt "digit d" is sent to.
    """

    def __init__(self, target):
        super().__init__()
        from d2m_dist.digits.classifier import digits_split
        from d2m_dist.digits.data import digit_captions
        from d2m_dist.digits.text_encoder import encode_captions
        from d2m_dist.models.sampling import pixels_to_latents

        split = digits_split()  # held-out real digits: the classifier never saw them
        firsts = [int((split.test_labels == d).nonzero()[0]) for d in range(10)]
        self.latents = pixels_to_latents(split.test_images[firsts])  # [10, 16, 4]
        self.captions = encode_captions(digit_captions(), 8)[0]  # [10, T, 384]
        self.target = target

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=False, **_):
        digit = [int(torch.cdist(e.flatten()[None], self.captions.flatten(1)).argmin()) for e in encoder_hidden_states]
        z = self.latents[[self.target(d) for d in digit]]
        return ((hidden_states - z) / timestep[:, None, None],)


def test_evaluate_reads_what_the_model_draws():
    # a model that draws each prompted digit: every sample reads right; one that always draws a zero: 1 in 10
    assert evaluate_teacher(FlowToDigit(lambda d: d), PretrainConfig(), n_per_digit=2, steps=3) == 1.0
    assert evaluate_teacher(FlowToDigit(lambda d: 0), PretrainConfig(), n_per_digit=2, steps=3) == pytest.approx(0.1)


def test_evaluate_runs_on_any_model(quick_run):
    _, result = quick_run
    # the same seed, the same samples, the same score (its meaning: test_evaluate_reads_what_the_model_draws)
    assert evaluate_teacher(result.ema, PretrainConfig(), n_per_digit=2, guidance_scale=2.0, steps=2) == \
        evaluate_teacher(result.ema, PretrainConfig(), n_per_digit=2, guidance_scale=2.0, steps=2)
    assert result.model.training  # evaluation leaves the mode as it found it
    evaluate_teacher(result.model, PretrainConfig(), n_per_digit=1, steps=1)
    assert result.model.training


def test_config_is_checked():
    with pytest.raises(ConfigError, match="sum"):
        PretrainConfig(axes_dims_rope=[8, 8, 8]).validate()
    with pytest.raises(ConfigError, match="caption_dropout"):
        PretrainConfig(caption_dropout=1.0).validate()


# The default teacher's accuracy (cfg1 >= 0.9, cfg2 >= 0.95, card == evaluation after reload) is checked on
# the teacher the demo trains: tests/test_demo.py (one training of the 1000-step teacher instead of two).


@pytest.mark.parametrize("override, expect", [
    ("lr=-1e-3", "lr must be > 0, got -0.001"),  # torch's optimizer raised a traceback at step 0
    ("warmup_steps=-5", "warmup_steps must be >= 0"),
    ("ema_decay=1.5", "ema_decay must be in (0, 1)"),
    ("batch_size=0", "batch_size must be > 0"),
])
def test_bad_pretrain_settings_are_one_line_before_any_work(tmp_path, capsys, override, expect):
    from d2m_dist.cli import main

    assert main(["teacher", "--out", str(tmp_path / "t"), override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"d2m: error: {expect}"), lines
    assert not (tmp_path / "t").exists()
