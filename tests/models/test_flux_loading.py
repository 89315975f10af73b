"""Teacher loading: diffusers folders, single-file original checkpoints, dtypes, meta, bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from d2m_dist.config import TeacherConfig
from d2m_dist.models.flux import FLUX1_DEV_CONFIG, TeacherLoadError, build_flux, call_flux, load_teacher
from d2m_dist.models.flux_single_file import infer_config, original_to_diffusers
from tests.flux_original import diffusers_to_original
from tests.tiny import TINY_CONFIG, save_tiny_teacher, tiny_flux, tiny_inputs


def same_outputs(a, b, rtol=0.0):
    x = tiny_inputs()
    with torch.no_grad():
        ya, yb = call_flux(a, x), call_flux(b, x.to(dtype=next(b.parameters()).dtype)).float()
    return ((ya - yb).norm() / ya.norm()).item() <= rtol


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    return root, save_tiny_teacher(root)


def test_pipeline_root_and_transformer_folder(saved):
    root, model = saved
    for path in (root, root / "transformer"):
        t = load_teacher(TeacherConfig(path=str(path)))
        assert not any(p.requires_grad for p in t.parameters()) and not t.training
        assert same_outputs(model, t)


def test_bf16_and_meta(saved):
    root, model = saved
    t = load_teacher(TeacherConfig(path=str(root), dtype="bf16"))
    assert next(t.parameters()).dtype == torch.bfloat16
    # loading in bf16 gives exactly the fp32 model cast to bf16
    cast = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(cast[k], v) for k, v in t.state_dict().items())
    m = load_teacher(TeacherConfig(path=str(root)), meta=True)
    assert all(p.is_meta for p in m.parameters())


def test_single_file_original_checkpoint(tmp_path):
    model = tiny_flux(seed=3)
    orig = diffusers_to_original(model.state_dict(), TINY_CONFIG["num_layers"], TINY_CONFIG["num_single_layers"])
    f = tmp_path / "flux-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(f))
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    t = load_teacher(TeacherConfig(path=str(f), config=str(tmp_path / "config.json")))
    assert same_outputs(model, t)
    # "model.diffusion_model." prefixed keys (ComfyUI-style exports) load too
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in orig.items()}, str(f))
    assert same_outputs(model, load_teacher(TeacherConfig(path=str(f), config=str(tmp_path / "config.json"))))


def test_single_file_without_guidance_embedding(tmp_path):
    """FLUX.1 [schnell]'s architecture: no guidance_in; the config is inferred from the tensors."""
    model = tiny_flux(seed=4, guidance_embeds=False)
    orig = diffusers_to_original(model.state_dict(), TINY_CONFIG["num_layers"], TINY_CONFIG["num_single_layers"])
    assert not any(k.startswith("guidance_in") for k in orig)
    f = tmp_path / "flux-schnell-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(f))
    # the head split is not in the weights; whether guidance is embedded is (guidance_in)
    head = {k: v for k, v in TINY_CONFIG.items() if k != "guidance_embeds"}
    (tmp_path / "config.json").write_text(json.dumps(head))
    t = load_teacher(TeacherConfig(path=str(f), config=str(tmp_path / "config.json")))
    assert t.config.guidance_embeds is False
    assert same_outputs(model, t)  # the inputs carry a guidance value: a model without the embedding ignores it


def test_mapping_matches_diffusers_on_flux_dev_shapes():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dev = build_flux(FLUX1_DEV_CONFIG, meta=True)
    orig = diffusers_to_original(dev.state_dict(), 19, 38)
    ours = original_to_diffusers(dict(orig))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(orig))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert infer_config(ours) == {k: v for k, v in FLUX1_DEV_CONFIG.items()}


def test_single_file_meta_reads_header_only(tmp_path):
    model = tiny_flux()
    orig = diffusers_to_original(model.state_dict(), 2, 2)
    f = tmp_path / "t.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(f))
    (tmp_path / "c.json").write_text(json.dumps(TINY_CONFIG))
    m = load_teacher(TeacherConfig(path=str(f), config=str(tmp_path / "c.json")), meta=True)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in model.parameters())


def test_bad_teachers(tmp_path, saved):
    root, model = saved
    with pytest.raises(TeacherLoadError, match="not found"):
        load_teacher(TeacherConfig(path=str(tmp_path / "missing")))
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(TeacherLoadError, match="not a FLUX checkpoint"):
        load_teacher(TeacherConfig(path=str(other)))
    orig = diffusers_to_original(model.state_dict(), 2, 2)
    f = tmp_path / "trunc.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(f))
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TeacherLoadError, match="truncated"):
        load_teacher(TeacherConfig(path=str(f)))
    with pytest.raises(TeacherLoadError, match="without weights"):
        load_teacher(TeacherConfig(path="meta:flux1-dev"))
    # a checkpoint whose shapes disagree with the given config
    (tmp_path / "wrong.json").write_text(json.dumps({**TINY_CONFIG, "num_attention_heads": 4}))
    g = tmp_path / "ok.safetensors"
    save_file({k: v.contiguous() for k, v in orig.items()}, str(g))
    with pytest.raises(TeacherLoadError, match="does not match"):
        load_teacher(TeacherConfig(path=str(g), config=str(tmp_path / "wrong.json")))
