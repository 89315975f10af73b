"""The student as a diffusers model: round trips through both folder kinds, the knobs, atomic writing."""

import json

import pytest
import torch

from d2m_dist.config import ConfigError, MoBConfig, MoBGroupConfig
from d2m_dist.models import diffusers_student as ds
from d2m_dist.models.diffusers_student import (
    FluxMoETransformer2DModel,
    load_any_student,
    student_base_config,
    write_diffusers_student,
)
from d2m_dist.models.flux import call_flux
from d2m_dist.models.mob import mob_groups
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.portable import StudentMeta, load_student, read_provenance, read_state_dict, write_student
from tests.models.test_portable import convert
from tests.tiny import tiny_inputs

MOB = MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny stage-0 student at 1S4E2A with a Mixture-of-Blocks group over the two single blocks."""
    _, out = convert(tmp_path_factory.mktemp("ds"), mob=MOB)
    return out


def _velocity(model, inputs):
    with torch.no_grad():
        return call_flux(model, inputs)


def test_portable_to_diffusers_to_from_pretrained_gives_the_portable_students_outputs(student, tmp_path):
    folder = write_diffusers_student(student, tmp_path / "diffusers")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors", "provenance.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "FluxMoETransformer2DModel" and config["site_specs"]["double.0.ff"] == "1S4E2A"
    reference = load_student(student)
    x = tiny_inputs()
    want = _velocity(reference, x)
    for model in (FluxMoETransformer2DModel.from_pretrained(folder), FluxMoETransformer2DModel.from_portable(student),
                  load_any_student(folder), load_any_student(student)):
        assert type(model) is FluxMoETransformer2DModel and not model.training
        torch.testing.assert_close(_velocity(model, x), want, rtol=0, atol=0)
    # the architecture a student came from reads the same from either folder kind
    assert student_base_config(folder) == student_base_config(student)


def test_top_k_and_kappa_are_config_values_that_survive_save_and_load(student, tmp_path):
    model = FluxMoETransformer2DModel.from_portable(student)
    x = tiny_inputs()
    before = _velocity(model, x)
    model.set_top_k(3)
    model.set_mob_kappa(2)
    changed = _velocity(model, x)
    assert not torch.allclose(changed, before)  # the knobs reach the layers
    model.save_pretrained(tmp_path / "knobs")
    again = FluxMoETransformer2DModel.from_pretrained(tmp_path / "knobs")
    assert again.config.top_k == 3 and again.config.mob_kappa == 2
    assert [layer.top_k for _, layer in moe_layers(again)] == [3] * 6
    assert [group.kappa for _, group in mob_groups(again)] == [2]
    torch.testing.assert_close(_velocity(again, x), changed, rtol=0, atol=0)
    # None restores each site's spec k and each group's own kappa
    again.set_top_k(None)
    again.set_mob_kappa(None)
    assert [layer.top_k for _, layer in moe_layers(again)] == [2] * 6 and mob_groups(again)[0][1].kappa == 1
    torch.testing.assert_close(_velocity(again, x), before, rtol=0, atol=0)


def test_bf16_loading_keeps_every_router_in_fp32(student, tmp_path):
    folder = write_diffusers_student(student, tmp_path / "diffusers")
    model = FluxMoETransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16)
    routers = {n: p.dtype for n, p in model.named_parameters() if ".router." in n}
    assert len(routers) == 6 + 2 and set(routers.values()) == {torch.float32}  # 6 MoE sites, MoB's w_x and w_y
    assert model.x_embedder.weight.dtype == torch.bfloat16


def test_knob_out_of_range_is_a_config_error(student):
    model = FluxMoETransformer2DModel.from_portable(student)
    with pytest.raises(ConfigError, match="top_k=5: must lie in 0..4"):
        model.set_top_k(5)
    with pytest.raises(ConfigError, match="mob_kappa=3: must lie in 1..2"):
        model.set_mob_kappa(3)
    assert model.config.top_k is None and model.config.mob_kappa is None  # a refused value is not recorded


def test_mob_kappa_on_a_student_without_groups_is_refused(tmp_path):
    _, out = convert(tmp_path)
    with pytest.raises(ConfigError, match="no Mixture-of-Blocks groups"):
        FluxMoETransformer2DModel.from_portable(out).set_mob_kappa(1)


def test_sharded_portable_folder_becomes_a_sharded_diffusers_folder(student, tmp_path):
    sharded = write_student(tmp_path / "sharded", read_state_dict(student), StudentMeta.read(student),
                            read_provenance(student), max_shard_size="20KB")
    folder = write_diffusers_student(sharded, tmp_path / "diffusers")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all(f.startswith("diffusion_pytorch_model-") for f in files)
    assert all((folder / f).is_file() for f in files)
    x = tiny_inputs()
    torch.testing.assert_close(_velocity(FluxMoETransformer2DModel.from_pretrained(folder), x),
                               _velocity(load_student(student), x), rtol=0, atol=0)


def test_writing_is_all_or_nothing(student, tmp_path, monkeypatch):
    out = tmp_path / "diffusers"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        write_diffusers_student(student, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ds, "_link_or_copy", crash)
    with pytest.raises(OSError, match="disk full"):
        write_diffusers_student(student, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diffusers"]  # no temporary folder left


def test_stage_zero_writes_its_diffusers_twin_when_asked(tmp_path):
    _, out = convert(tmp_path, export_diffusers=True)
    twin = tmp_path / "student-diffusers"
    x = tiny_inputs()
    torch.testing.assert_close(_velocity(FluxMoETransformer2DModel.from_pretrained(twin), x),
                               _velocity(load_student(out), x), rtol=0, atol=0)
