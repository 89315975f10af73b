"""Images from the student: FluxPipeline with the exported student, `d2m generate`, and its bad input."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

import d2m_dist.digits  # noqa: F401  (registers the digits pipeline kind, also in spawned ranks)
from d2m_dist.cli import main
from d2m_dist.config import CalibrationConfig, ConvertConfig, MoBConfig, MoBGroupConfig, MoEConfig, TeacherConfig
from d2m_dist.convert.pipeline import run_convert
from d2m_dist.eval.generate import GenerateRequest, read_prompts, run_generate
from d2m_dist.models.diffusers_student import FluxMoETransformer2DModel, write_diffusers_student
from d2m_dist.models.flux import unpack_latents
from d2m_dist.models.portable import load_student
from d2m_dist.models.sampling import SamplerConfig, euler_sample
from tests.distributed import run_ranks
from tests.tiny import save_tiny_flux_pipeline, tiny_flux

PROMPT = "a red cat on the grass"
SIDE = 64  # pixels: an 8x8 latent, 4x4 = 16 tokens after packing


def _convert(teacher_root, out, **kw):
    return run_convert(ConvertConfig(teacher=TeacherConfig(path=str(teacher_root)), moe=MoEConfig(spec="1S4E2A"),
                                     calibration=CalibrationConfig(num_batches=2, batch_size=2), output=str(out), **kw))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A tiny FLUX pipeline folder (teacher in transformer/), its stage-0 student with a MoB group over the
    single blocks, and that student as a diffusers folder."""
    root = tmp_path_factory.mktemp("gen")
    pipeline = save_tiny_flux_pipeline(root / "pipeline", tiny_flux(0))
    student = _convert(pipeline, root / "student", mob=MoBConfig(enabled=True, single=MoBGroupConfig(m=2, kappa=1)))
    return pipeline, student, write_diffusers_student(student, root / "student-diffusers")


def _pipe(pipeline, transformer=None):
    kwargs = {} if transformer is None else {"transformer": transformer}
    pipe = FluxPipeline.from_pretrained(str(pipeline), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seed, steps=4, prompt=PROMPT, **kw):
    """[B, 3, H, W] in [0, 1], fp32."""
    return pipe(prompt, height=SIDE, width=SIDE, num_inference_steps=steps, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images


def test_flux_pipeline_driving_the_exported_student_equals_our_sampler(flux):
    """Same prompt, seed and steps: FluxPipeline with the exported student, and our Euler sampler on the portable one."""
    pipeline, student, exported = flux
    pipe = _pipe(pipeline, FluxMoETransformer2DModel.from_pretrained(exported))
    with torch.no_grad():
        theirs = pipe(PROMPT, height=SIDE, width=SIDE, num_inference_steps=4, guidance_scale=3.5,
                      generator=torch.Generator().manual_seed(7), output_type="latent").images
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, None, max_sequence_length=512)
    ours = euler_sample(load_student(student), embeds, pooled, grid=(SIDE // 16, SIDE // 16), channels=16,
                        cfg=SamplerConfig(steps=4, shift=True, embedded_guidance=3.5, seed=7))
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # and decoded, as the pipeline decodes: (z / scale + shift) through the VAE, [-1, 1] -> [0, 1]
    image = _images(pipe, 7)
    vae = pipe.vae
    with torch.no_grad():
        z = unpack_latents(ours, SIDE // 8, SIDE // 8) / vae.config.scaling_factor + vae.config.shift_factor
        mine = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(image, mine, rtol=0, atol=1e-5)
    # another seed is another image: the seed reaches both
    assert (_images(pipe, 8) - image).abs().max() > 1e-2


def test_every_expert_and_block_on_the_exported_student_draws_the_teachers_image(flux):
    """The lossless identity, end to end: stage 0 with unit gates is the dense teacher inside FluxPipeline."""
    pipeline, _, exported = flux
    student = FluxMoETransformer2DModel.from_pretrained(exported)
    student.set_unit_gates(True)
    with torch.no_grad():
        want = _images(_pipe(pipeline), 3)
        got = _images(_pipe(pipeline, student), 3)
        student.set_unit_gates(False)
        routed = _images(_pipe(pipeline, student), 3)
    assert (got - want).abs().max() < 1e-5
    assert (routed - want).abs().max() > 1e-3  # top-2 of 4 experts and one block of two: another image


def test_generate_writes_pngs_grid_and_json_with_the_pipelines_images(flux, tmp_path):
    pipeline, student, _ = flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n\na blue dog\n")
    out = tmp_path / "out"
    rc = main(["generate", "--student", str(student), "--pipeline", str(pipeline), "--prompts", str(prompts),
               "--seed", "11", "--steps", "3", "--height", str(SIDE), "--width", str(SIDE), "--teacher-too",
               "--top-k", "3", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "generate.json").read_text())
    assert result["kind"] == "flux" and result["steps"] == 3 and result["guidance"] == 3.5 and result["top_k"] == 3
    assert [r["prompt"] for r in result["images"]] == [PROMPT, "a blue dog"]
    assert [r["seed"] for r in result["images"]] == [11, 12]
    assert all(set(r["seconds"]) == {"teacher", "student"} and min(r["seconds"].values()) > 0
               for r in result["images"])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * (SIDE + 4), 2 * (SIDE + 4), 3)  # two prompts x (teacher, student), 2-pixel gaps
    # each PNG is what FluxPipeline draws for that prompt and seed
    student_model = FluxMoETransformer2DModel.from_portable(student)
    student_model.set_top_k(3)
    with torch.no_grad():
        want = _images(_pipe(pipeline, student_model), 12, steps=3, prompt="a blue dog")
        want_teacher = _images(_pipe(pipeline), 12, steps=3, prompt="a blue dog")
    for name, expected in (("student", want), ("teacher", want_teacher)):
        png = np.asarray(Image.open(out / result["images"][1]["files"][name]))
        expected_u8 = (expected[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(png, expected_u8), name


def test_a_folders_saved_knobs_hold_unless_the_command_sets_them(flux, tmp_path):
    pipeline, student, _ = flux
    model = FluxMoETransformer2DModel.from_portable(student)
    model.set_top_k(1)
    model.save_pretrained(tmp_path / "k1")
    out = tmp_path / "out"
    assert main(["generate", "--student", str(tmp_path / "k1"), "--pipeline", str(pipeline), "--prompt", PROMPT,
                 "--steps", "2", "--height", str(SIDE), "--width", str(SIDE), "--out", str(out)]) == 0
    result = json.loads((out / "generate.json").read_text())
    assert result["top_k"] == 1 and result["mob_kappa"] is None
    with torch.no_grad():
        want = _images(_pipe(pipeline, FluxMoETransformer2DModel.from_pretrained(tmp_path / "k1")), 0, steps=2)
    png = np.asarray(Image.open(out / result["images"][0]["files"]["student"]))
    assert np.array_equal(png, (want[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def other_architecture_student(tmp_path_factory):
    root = tmp_path_factory.mktemp("other")
    teacher = tiny_flux(0, num_single_layers=1)
    teacher.save_pretrained(root / "teacher" / "transformer")
    (root / "teacher" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return _convert(root / "teacher", root / "student")


@pytest.mark.parametrize("case", ["other_architecture", "no_vae", "no_text_encoders", "vae_without_weights",
                                  "top_k_above", "empty_prompts", "kappa_above", "size", "seed", "out_in_pipeline"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(flux, other_architecture_student, tmp_path, capsys, case):
    pipeline, student, exported = flux
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" if case != "empty_prompts" else "\n  \n")
    args = {"--student": str(exported), "--pipeline": str(pipeline), "--prompts": str(prompts),
            "--height": str(SIDE), "--width": str(SIDE), "--steps": "2"}
    expect = {"other_architecture": "converted from another FLUX architecture (num_single_layers 1 here 2",
              "no_vae": "no vae/", "no_text_encoders": "no text_encoder/, text_encoder_2/",
              "top_k_above": "top_k=5: must lie in 0..4", "empty_prompts": "holds no prompt",
              "kappa_above": "mob_kappa=3: must lie in 1..2", "size": "--height 60: must be a positive multiple of 16",
              "vae_without_weights": "vae/ holds no weights", "seed": "--seed -1: must lie in",
              "out_in_pipeline": "overlaps --pipeline"}
    if case == "other_architecture":
        args["--student"] = str(other_architecture_student)
    elif case in ("no_vae", "no_text_encoders"):
        drop = ["vae"] if case == "no_vae" else ["text_encoder", "text_encoder_2"]
        copy = tmp_path / "pipeline"
        shutil.copytree(pipeline, copy, ignore=lambda d, names: [n for n in names if n in drop and d == str(pipeline)])
        args["--pipeline"] = str(copy)
    elif case == "vae_without_weights":
        copy = tmp_path / "pipeline"
        shutil.copytree(pipeline, copy)
        for f in (copy / "vae").glob("*.safetensors"):
            f.unlink()
        args["--pipeline"] = str(copy)
    elif case == "seed":
        args["--seed"] = "-1"
    elif case == "top_k_above":
        args["--top-k"] = "5"
    elif case == "kappa_above":
        args["--mob-kappa"] = "3"
    elif case == "size":
        args["--height"] = "60"
    out = pipeline / "out" if case == "out_in_pipeline" else tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    pipeline_before = sorted(p.name for p in pipeline.iterdir())
    rc = main(["generate", *[x for kv in args.items() for x in kv], "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("d2m: error: "), err
    assert expect[case] in err[0], err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder
    assert sorted(p.name for p in pipeline.iterdir()) == pipeline_before


def test_prompt_file_formats(tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "two cats", "tag": "counting"}\n\n{"prompt": "a red dog"}\n')
    assert read_prompts(None, str(lines)) == ["two cats", "a red dog"]
    with pytest.raises(Exception, match="exactly one of"):
        read_prompts("a", str(lines))


# ----------------------------------------------------------------------------- the digits preset

DIGIT_PROMPTS = ["a handwritten digit three", "a handwritten digit seven", "a handwritten digit zero"]


def test_generate_on_the_digits_preset_writes_the_grid_and_json(digits_teacher, digits_student, tmp_path):
    out = tmp_path / "out"
    rc = main(["generate", "--student", str(digits_student), "--pipeline", str(digits_teacher), "--prompt",
               DIGIT_PROMPTS[0], "--teacher-too", "--steps", "8", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "generate.json").read_text())
    assert result["kind"] == "digits" and (result["height"], result["width"]) == (8, 8)
    assert (out / "grid.png").is_file() and np.asarray(Image.open(out / "student/00000.png")).shape == (8, 8, 3)


def _generate_on_ranks(rank, world, teacher, student, out, marker):
    """Two runs in the same processes: every prompt (sharded over the ranks), then one where rank 1 fails."""
    from d2m_dist.config import ConfigError

    run_generate(GenerateRequest(student=str(student), pipeline=str(teacher), prompts=DIGIT_PROMPTS, out=str(out),
                                 steps=8, guidance=2.0), torch.device("cpu"))
    if marker is None:
        return
    missing = str(out.parent / "no-such-student")
    try:
        run_generate(GenerateRequest(student=missing if rank == 1 else str(student), pipeline=str(teacher),
                                     prompts=DIGIT_PROMPTS, out=str(out.parent / "failed-out"), steps=2),
                     torch.device("cpu"))
    except ConfigError as exc:
        (marker.parent / f"{marker.name}{rank}").write_text(str(exc))


def test_prompts_sharded_over_two_ranks_give_the_one_rank_images_and_a_failure_stops_every_rank(
        digits_teacher, digits_student, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _generate_on_ranks(0, 1, digits_teacher, digits_student, one, None)
    run_ranks(_generate_on_ranks, 2, digits_teacher, digits_student, two, tmp_path / "failed", timeout=300)
    a, b = (json.loads((d / "generate.json").read_text()) for d in (one, two))
    assert b["world_size"] == 2 and [r["rank"] for r in b["images"]] == [0, 1, 0]
    for ra, rb in zip(a["images"], b["images"]):
        assert ra["prompt"] == rb["prompt"] and ra["seed"] == rb["seed"]
        assert np.array_equal(np.asarray(Image.open(one / ra["files"]["student"])),
                              np.asarray(Image.open(two / rb["files"]["student"])))
    # rank 1 could not find its student: both ranks raised the same error naming it (none waited in a
    # collective), and the second run wrote nothing
    for rank in range(2):
        assert (tmp_path / f"failed{rank}").read_text().startswith("[rank 1] student not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed0", "failed1", "one", "two"]


def test_generate_on_a_digiteval_teacher_draws_its_rgb_canvases(digiteval_teacher, digiteval_student, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--student", str(digiteval_student), "--pipeline", str(digiteval_teacher), "--prompt",
                 "a red three and a blue seven", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "generate.json").read_text())
    assert (result["height"], result["width"]) == (16, 16)
    assert np.asarray(Image.open(out / "student/00000.png")).shape == (16, 16, 3)
    assert main(["generate", "--student", str(digiteval_student), "--pipeline", str(digiteval_teacher), "--prompt",
                 "a seven", "--height", "8", "--out", str(tmp_path / "bad")]) == 2
