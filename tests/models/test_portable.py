import torch

from d2m_dist.config import CalibrationConfig, ConvertConfig, MoBConfig, MoBGroupConfig, MoEConfig, TeacherConfig
from d2m_dist.convert.pipeline import run_convert
from d2m_dist.models.flux import call_flux
from d2m_dist.models.mob import mob_groups
from d2m_dist.models.moe import moe_layers
from d2m_dist.models.portable import StudentMeta, load_student, read_provenance, read_state_dict
from d2m_dist.models.surgery import dense_ffn, moe_layer_at
from tests.tiny import save_tiny_teacher, tiny_inputs


def convert(tmp_path, **kw):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    cfg = ConvertConfig(
        teacher=TeacherConfig(path=str(tmp_path / "teacher")),
        moe=MoEConfig(spec="1S4E2A"),
        calibration=CalibrationConfig(num_batches=2, batch_size=2),
        output=str(tmp_path / "student"),
        **kw,
    )
    return teacher, run_convert(cfg)


def test_provenance_is_a_permutation_and_weights_match_teacher(tmp_path):
    teacher, out = convert(tmp_path)
    prov = read_provenance(out)
    sd = read_state_dict(out)
    meta = StudentMeta.read(out)
    assert set(prov) == set(meta.sites) and len(prov) == 6
    for site, part in prov.items():
        dense = dense_ffn(teacher, site)
        flat = torch.cat([part.shared, part.experts.reshape(-1)])
        assert torch.equal(flat.sort().values, torch.arange(dense.hidden)), site
        stream, i, kind = site.split(".")
        prefix = f"transformer_blocks.{i}.{kind}" if stream == "double" else f"single_transformer_blocks.{i}.mlp"
        assert torch.equal(sd[f"{prefix}.shared.fc1.weight"], dense.w1[part.shared])
        assert torch.equal(sd[f"{prefix}.shared.fc1.bias"], dense.b1[part.shared])
        assert torch.equal(sd[f"{prefix}.shared.fc2.weight"], dense.w2[:, part.shared])
        for e in range(part.experts.shape[0]):
            assert torch.equal(sd[f"{prefix}.experts.w1"][e], dense.w1[part.experts[e]])
            assert torch.equal(sd[f"{prefix}.experts.b1"][e], dense.b1[part.experts[e]])
            assert torch.equal(sd[f"{prefix}.experts.w2"][e], dense.w2[:, part.experts[e]])


def test_load_student_rebuilds_from_folder_alone(tmp_path):
    teacher, out = convert(tmp_path, mob=MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    student = load_student(out)
    assert len(moe_layers(student)) == 6 and len(mob_groups(student)) == 1
    x = tiny_inputs()
    for _, layer in moe_layers(student):
        layer.unit_gates = True
    for _, g in mob_groups(student):
        g.unit_gates = True
    with torch.no_grad():
        got, want = call_flux(student, x), call_flux(teacher, x)
    assert ((got - want).norm() / want.norm()) < 1e-5
    # routers were initialised (mean_w1) and survive the round trip
    layer = moe_layer_at(student, "double.0.ff")
    part = read_provenance(out)["double.0.ff"]
    want_router = dense_ffn(teacher, "double.0.ff").w1[part.experts].mean(1)
    torch.testing.assert_close(layer.router.weight, want_router)


def test_sharded_weights_round_trip(tmp_path):
    from d2m_dist.models.portable import write_student

    teacher, out = convert(tmp_path)
    meta = StudentMeta.read(out)
    sd = read_state_dict(out)
    sharded = write_student(tmp_path / "sharded", sd, meta, read_provenance(out), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    sd2 = read_state_dict(sharded)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    load_student(sharded)


def test_load_student_in_bf16_keeps_every_router_fp32(tmp_path):
    """Routers decide from small logit differences (MoE and MoB alike): they stay fp32 in a bf16 student."""
    _, out = convert(tmp_path, mob=MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    fp32 = load_student(out)
    student = load_student(out, dtype=torch.bfloat16)
    assert all(layer.router.weight.dtype == torch.float32 for _, layer in moe_layers(student))
    assert all(p.dtype == torch.float32 for _, g in mob_groups(student) for p in g.router.parameters())
    assert next(student.transformer_blocks[0].attn.parameters()).dtype == torch.bfloat16
    # the same as casting the fp32 student by hand and putting every router back in fp32
    ref = fp32.to(torch.bfloat16)
    for _, m in moe_layers(ref) + mob_groups(ref):
        m.router.float()
    x = tiny_inputs().to(dtype=torch.bfloat16)
    with torch.no_grad():  # (a bf16 MoB router fed fp32 pooled features failed here before)
        assert torch.equal(call_flux(student, x), call_flux(ref, x))


def test_reading_an_expert_slice_reads_only_those_rows(tmp_path):
    """Under expert parallelism each rank reads its experts' rows of every stack, not the whole stack."""
    _, out = convert(tmp_path)
    full = read_state_dict(out)
    key = next(k for k in full if k.endswith(".experts.w1"))
    part = read_state_dict(out, rows={key: slice(1, 3)})
    assert torch.equal(part[key], full[key][1:3])
    # its own storage, the size of the two rows (not a view that keeps the whole stack alive)
    assert part[key].untyped_storage().nbytes() == part[key].numel() * part[key].element_size()
    assert set(part) == set(full) and torch.equal(part[key.replace("w1", "w2")], full[key.replace("w1", "w2")])
