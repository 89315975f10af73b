import pytest
import torch
from torch import nn

from d2m_dist.models.flux import build_flux
from d2m_dist.models.sampling import (
    SamplerConfig,
    euler_sample,
    latents_to_pixels,
    pixels_to_latents,
    timestep_schedule,
    uint8_to_unit,
    unit_to_uint8,
)

TXT, JOINT, POOLED, CHANNELS, GRID = 5, 24, 12, 4, (4, 4)


class ExactVelocity(nn.Module):
    """Predicts the true rectified-flow velocity ``e - z = (x_t - z) / t`` towards a fixed ``z``."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.z = z
        self.calls = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, return_dict=False):
        self.calls.append((timestep.clone(), hidden_states.shape[0]))
        t = timestep[:, None, None]
        z = self.z.repeat(hidden_states.shape[0] // self.z.shape[0], 1, 1)  # CFG doubles the batch
        return ((hidden_states - z) / t,)


def text(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TXT, JOINT, generator=g), torch.randn(batch, POOLED, generator=g)


@pytest.mark.parametrize("steps,shift", [(1, False), (7, False), (7, True)])
def test_exact_velocity_lands_on_z(steps, shift):
    z = torch.randn(3, 16, CHANNELS, generator=torch.Generator().manual_seed(5))
    model = ExactVelocity(z)
    embeds, pooled = text(3)
    out = euler_sample(model, embeds, pooled, grid=GRID, channels=CHANNELS,
                       cfg=SamplerConfig(steps=steps, shift=shift, seed=3))
    # straight paths: Euler is exact at any step count
    torch.testing.assert_close(out, z, atol=1e-5, rtol=0)
    times = [float(c[0][0]) for c in model.calls]
    assert len(times) == steps and times[0] == 1.0 and all(a > b for a, b in zip(times, times[1:]))


def test_cfg_uses_uncond_branch_and_scale_one_is_one_call():
    z = torch.randn(2, 16, CHANNELS)
    embeds, pooled = text(2)
    model = ExactVelocity(z)
    euler_sample(model, embeds, pooled, grid=GRID, channels=CHANNELS, cfg=SamplerConfig(steps=3))
    assert [n for _, n in model.calls] == [2, 2, 2]
    with pytest.raises(ValueError, match="uncond"):
        euler_sample(model, embeds, pooled, grid=GRID, channels=CHANNELS, cfg=SamplerConfig(guidance_scale=2.0))
    model = ExactVelocity(z)
    ue, up = text(1, seed=9)
    out = euler_sample(model, embeds, pooled, grid=GRID, channels=CHANNELS, uncond_embeds=ue, uncond_pooled=up,
                       cfg=SamplerConfig(steps=3, guidance_scale=4.0))
    assert [n for _, n in model.calls] == [4, 4, 4]  # cond and uncond in one call
    # both branches agree here, so any guidance scale leaves the result at z
    torch.testing.assert_close(out, z, atol=1e-5, rtol=0)


def tiny_model():
    torch.manual_seed(0)
    return build_flux({
        "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "guidance_embeds": True, "in_channels": CHANNELS,
        "joint_attention_dim": JOINT, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
        "patch_size": 1, "pooled_projection_dim": POOLED,
    }).eval()


def test_seed_fixes_the_output():
    model = tiny_model()
    embeds, pooled = text(2)
    ue, up = text(1, seed=9)
    run = lambda seed: euler_sample(model, embeds, pooled, grid=GRID, channels=CHANNELS, uncond_embeds=ue,
                                    uncond_pooled=up, cfg=SamplerConfig(steps=4, guidance_scale=2.5, seed=seed))
    a, b, c = run(1), run(1), run(2)
    assert a.shape == (2, 16, CHANNELS)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_schedule_endpoints_and_shift():
    plain = timestep_schedule(4, 16, shift=False)
    assert plain.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = timestep_schedule(4, 4096, shift=True)
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:-1] > plain[1:-1]).all()  # more time near noise
    with pytest.raises(ValueError):
        timestep_schedule(0, 16, shift=False)


def test_pixel_latents_round_trip():
    images = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    unit = uint8_to_unit(images)
    assert unit.min() >= -1 and unit.max() <= 1
    packed = pixels_to_latents(unit)
    assert packed.shape == (3, 16, 4)
    # token (0, 0) is the top-left 2x2 patch, row-major
    assert torch.equal(packed[0, 0], unit[0, :2, :2].reshape(4))
    assert torch.equal(latents_to_pixels(packed, 8, 8), unit)
    assert torch.equal(unit_to_uint8(latents_to_pixels(packed, 8, 8)), images)
    with pytest.raises(ValueError):
        pixels_to_latents(torch.zeros(1, 7, 8))


class PooledVelocity(nn.Module):
    """A velocity that depends only on the text: the mean of the pooled vector, everywhere."""

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, return_dict=False):
        return (pooled_projections.mean(-1)[:, None, None].expand_as(hidden_states),)


def test_cfg_combines_branches_with_the_scale():
    embeds, pooled = text(2)
    ue, up = text(1, seed=9)
    noise = torch.randn(2, 16, CHANNELS)
    out = euler_sample(PooledVelocity(), embeds, pooled, grid=GRID, channels=CHANNELS, noise=noise,
                       uncond_embeds=ue, uncond_pooled=up, cfg=SamplerConfig(steps=5, guidance_scale=3.0))
    v_c, v_u = pooled.mean(-1), up.mean(-1)
    v = v_u + 3.0 * (v_c - v_u)  # constant in time, so x_0 = x_1 - v
    torch.testing.assert_close(out, noise - v[:, None, None].expand_as(noise), atol=1e-5, rtol=0)
