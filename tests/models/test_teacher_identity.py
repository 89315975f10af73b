"""Teacher files that are not FLUX, and the fingerprint that ties a student to its teacher."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from d2m_dist.models.flux import load_flux_config
from d2m_dist.models.flux_config import TeacherLoadError
from d2m_dist.models.teacher_identity import check_teacher_weights, teacher_fingerprint
from tests.flux_original import diffusers_to_original
from tests.tiny import TINY_CONFIG, save_tiny_teacher


def test_flux_weights_pass_and_other_weights_under_a_flux_config_are_one_line(tmp_path):
    save_tiny_teacher(tmp_path / "ok")
    check_teacher_weights(tmp_path / "ok", load_flux_config(tmp_path / "ok"))

    # a FLUX config.json beside the weights of another model (what a mislabelled download looks like)
    save_tiny_teacher(tmp_path / "other")
    weights = tmp_path / "other" / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({"encoder.block.0.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(8, 4)}, str(weights))
    with pytest.raises(TeacherLoadError) as err:
        check_teacher_weights(tmp_path / "other", load_flux_config(tmp_path / "other"))
    msg = str(err.value)
    assert "not the FLUX transformer its config.json describes" in msg and "encoder.block.0.weight" in msg
    assert "\n" not in msg


def test_weights_of_another_width_than_the_config_are_one_line(tmp_path):
    save_tiny_teacher(tmp_path / "t")
    cfg_file = tmp_path / "t" / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["joint_attention_dim"] = cfg["joint_attention_dim"] * 2
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(TeacherLoadError, match=r"context_embedder.weight is \[\d+, \d+\], the config makes"):
        check_teacher_weights(tmp_path / "t", load_flux_config(tmp_path / "t"))


def test_fingerprint_follows_the_values_not_the_layout_or_dtype(tmp_path):
    model = save_tiny_teacher(tmp_path / "a", seed=0)
    fp = teacher_fingerprint(tmp_path / "a")
    assert len(fp) == 16

    # the same weights: copied, stored in bf16, or in the original single-file layout
    model.save_pretrained(tmp_path / "copy")
    assert teacher_fingerprint(tmp_path / "copy") == fp
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert teacher_fingerprint(tmp_path / "bf16") == fp
    orig = diffusers_to_original({k: v.float() for k, v in bf16.items()}, TINY_CONFIG["num_layers"],
                                 TINY_CONFIG["num_single_layers"])
    save_file({k: v.contiguous() for k, v in orig.items()}, str(tmp_path / "flux.safetensors"))
    assert teacher_fingerprint(tmp_path / "flux.safetensors") == fp

    # other weights of the same architecture; and one changed row of a hashed tensor
    save_tiny_teacher(tmp_path / "b", seed=1)
    assert teacher_fingerprint(tmp_path / "b") != fp
    sd = {k: v.clone() for k, v in model.float().state_dict().items()}
    sd["proj_out.weight"][-1] += 0.5
    model.load_state_dict(sd)
    model.save_pretrained(tmp_path / "tweaked")
    assert teacher_fingerprint(tmp_path / "tweaked") != fp
