"""The sample grid of latent-space presets: prompts from precomputed shards, VAE decoding, the trainer's grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from d2m_dist.eval import flux_samples as fs
from d2m_dist.models.flux import pack_latents

LATENT = (16, 4, 4)  # a 32x32 image through an 8x-downsampling, 16-channel VAE
TXT, DIM = 6, 16


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny FLUX pipeline folder (transformer + VAE) and two precomputed shards for it."""
    from diffusers import AutoencoderKL

    from tests.tiny import save_tiny_teacher, write_precomputed_shards

    root = tmp_path_factory.mktemp("flux_pipe")
    save_tiny_teacher(root, in_channels=4 * LATENT[0], joint_attention_dim=DIM, pooled_projection_dim=DIM)
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                  scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                  ).save_pretrained(root / "vae")
    return root, write_precomputed_shards(root / "shards", latent=LATENT, text_tokens=TXT, dim=DIM)


def test_decode_inverts_the_precompute_scaling(pipeline):
    from diffusers import AutoencoderKL

    root, _ = pipeline
    vae = fs.load_vae(fs.find_vae(str(root)), torch.device("cpu"))
    latents = torch.randn(2, *LATENT)
    got = fs.decode(vae, pack_latents(latents), LATENT)
    ref = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        x = ref.decode(latents / 0.3611 + 0.1159).sample
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert got.shape == (2, 32, 32, 3) and got.dtype == torch.uint8
    assert (got.int() - want.int()).abs().max() <= 1


def test_prompts_are_the_first_samples_in_a_fixed_order(pipeline):
    _, urls = pipeline
    a, b = fs.prompts_from_shards(urls, 3), fs.prompts_from_shards(urls, 3)
    assert a.captions == b.captions and len(a.captions) == 3 and torch.equal(a.embeds, b.embeds)
    assert a.embeds.shape == (3, TXT, DIM) and a.pooled.shape == (3, DIM) and a.latent_shape == LATENT


def test_find_vae(pipeline, tmp_path):
    root, _ = pipeline
    assert fs.find_vae(str(root)) == root / "vae"
    assert fs.find_vae(str(root / "transformer")) == root / "vae"  # the transformer subfolder as the teacher
    assert fs.find_vae(str(tmp_path)) is None
    assert fs.find_vae(str(tmp_path), "/some/vae") == Path("/some/vae")


@pytest.mark.multiproc
def test_stage_writes_a_vae_decoded_grid(pipeline, tmp_path):
    from d2m_dist.cli import main
    from tests.distill.test_trainer import launch, stage_config

    root, urls = pipeline
    student = tmp_path / "stage0"
    rc = main(["convert", "--config", "configs/stage0.yaml", f"teacher.path={root}", "teacher.dtype=fp32",
               "moe.spec=1S4E2A", "calibration.num_batches=1", "calibration.image_tokens=4",
               f"calibration.text_tokens={TXT}", f"output={student}", "device=cpu"])
    assert rc == 0
    cfg = stage_config(tmp_path, root, student, stage=1)
    p = launch(cfg, 1, "data.source=shards", f"data.urls={urls}", "data.batch_size=2", "steps=2", "log.wandb=false",
               "log.sample_every=2", "log.sample_count=3", "log.sample_steps=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    samples = tmp_path / "run" / "stage1" / "samples"
    with Image.open(samples / "step_000002.png") as im:
        assert im.size == (3 * 36, 2 * 36)  # 3 prompts; teacher and student rows; 32 px tiles, 2 px gaps
    assert (samples / "prompts.txt").read_text().splitlines() == fs.prompts_from_shards(urls, 3).captions
