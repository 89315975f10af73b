"""DigitEval's figures against hand calculations: spread over seeds, image and velocity fidelity; noise by seed."""

import copy
import math

import numpy as np
import pytest
import torch

from d2m_dist.config import TeacherConfig
from d2m_dist.digits import draw as draw_module
from d2m_dist.digits.card import teacher_card
from d2m_dist.digits.digiteval import make_prompts
from d2m_dist.digits.digiteval_run import image_fidelity, sample_prompts, spread, summarise, velocity_fidelity
from d2m_dist.models.flux import load_teacher


def test_spread_is_the_mean_and_the_sample_standard_deviation():
    assert spread([0.5, 0.7]) == pytest.approx({"mean": 0.6, "std": math.sqrt(0.02)})
    assert spread([0.25]) == {"mean": 0.25, "std": 0.0}
    s = summarise([{"single": 1.0, "overall": 0.5}, {"single": 0.0, "overall": 0.7}])
    assert s["single"] == pytest.approx({"mean": 0.5, "std": math.sqrt(0.5)}) and s["overall"]["mean"] == 0.6


def test_image_fidelity_by_hand():
    a = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 3, 4, 1] = 255  # one value of 768 off by the full range
    got = image_fidelity(b, a)
    assert got["mse"] == pytest.approx(1 / 768) and got["psnr"] == pytest.approx(10 * math.log10(768))
    assert image_fidelity(a, a) == {"mse": 0.0, "psnr": math.inf}


@pytest.fixture(scope="module")
def teacher(digiteval_teacher):
    return load_teacher(TeacherConfig(path=str(digiteval_teacher))), teacher_card(digiteval_teacher)


def test_velocity_fidelity_is_zero_against_itself_and_the_offset_squared_for_a_shifted_output(teacher):
    model, card = teacher
    assert velocity_fidelity(model, model, card, batches=1, batch_size=4) == \
        {"0.00-0.25": 0.0, "0.25-0.50": 0.0, "0.50-0.75": 0.0, "0.75-1.00": 0.0}
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.proj_out.bias += 0.5  # every predicted velocity component moves by 0.5
    got = velocity_fidelity(shifted, model, card, batches=1, batch_size=4)
    assert list(got.values()) == pytest.approx([0.25] * 4, rel=1e-5)


def test_a_seed_fixes_the_images_whatever_the_chunk_size(teacher, monkeypatch):
    model, card = teacher
    prompts = make_prompts(2, seed=3)
    whole = sample_prompts(model, prompts, card, seed=4, guidance=2.0, steps=3).canvases
    monkeypatch.setattr(draw_module, "CHUNK", 5)
    chunked = sample_prompts(model, prompts, card, seed=4, guidance=2.0, steps=3).canvases
    other = sample_prompts(model, prompts, card, seed=5, guidance=2.0, steps=3).canvases
    assert whole.shape == (12, 16, 16, 3) and np.abs(whole.astype(int) - chunked).max() <= 1  # fp rounding only
    assert not np.array_equal(whole, other)
