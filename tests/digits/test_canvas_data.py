"""The "digiteval" task's training batches: composed canvases that meet their captions, packed losslessly."""

import numpy as np
import torch

from d2m_dist.digits.canvas_data import canvas_training_set, canvases_to_latents, draw_compositions
from d2m_dist.digits.card import PretrainConfig
from d2m_dist.digits.digiteval import CATEGORIES, SlotReader, digit_pools, holds
from d2m_dist.digits.digiteval_run import to_canvases
from d2m_dist.models.sampling import latents_to_pixels

CARD = PretrainConfig(task="digiteval", max_tokens=10, batch_size=48, caption_dropout=0.25)


def test_canvases_pack_into_64_tokens_of_12_channels_and_back_exactly():
    rng = np.random.default_rng(0)
    canvases = rng.integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    latents = canvases_to_latents(canvases)
    assert latents.shape == (3, 64, 12) and latents.min() >= -1 and latents.max() <= 1
    assert np.array_equal(to_canvases(latents_to_pixels(latents, 16, 16)), canvases)
    # token 0 is the top-left 2x2 patch: 3 channels x 4 pixels, channel-major as FLUX packs
    patch = canvases[0, :2, :2].astype(np.float32) / 127.5 - 1  # [2, 2, 3]
    assert torch.allclose(latents[0, 0], torch.from_numpy(patch.transpose(2, 0, 1).reshape(12)))


def test_compositions_meet_their_prompts_and_cover_every_category():
    prompts, canvases = draw_compositions(120, digit_pools().held_out, np.random.default_rng(1))
    reader = SlotReader()
    met = [holds(p, reader.read(c)) for p, c in zip(prompts, canvases)]
    assert np.mean(met) >= 0.97  # the reader's own error on real held-out digits, nothing else
    assert {p.category for p in prompts} == set(CATEGORIES)


def test_batches_are_fixed_by_the_generator_and_drop_captions_to_the_empty_one():
    data = canvas_training_set(CARD.max_tokens)
    a = data.sample(CARD, torch.Generator().manual_seed(5))
    b = data.sample(CARD, torch.Generator().manual_seed(5))
    c = data.sample(CARD, torch.Generator().manual_seed(6))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.prompt_embeds, b.prompt_embeds)
    assert not torch.equal(a.latents, c.latents)
    assert a.latents.shape == (48, 64, 12) and a.prompt_embeds.shape == (48, 10, 384)
    assert a.img_ids.shape == (64, 3) and a.guidance.shape == (48,)
    dropped = (a.prompt_embeds == data.empty_embeds).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 48  # 25% dropout of 48: 12 expected
    kept = a.pooled[~dropped]
    assert all((row == data.caption_pooled).all(1).any() for row in kept)  # a caption's own encoding


def test_held_out_batches_compose_from_digits_teachers_never_saw():
    train, held = digit_pools().train, digit_pools().held_out
    flat = {bytes(d.tobytes()) for v in train.values() for d in v}
    assert not any(bytes(d.tobytes()) in flat for v in held.values() for d in v[:20])
    assert canvas_training_set(CARD.max_tokens, held_out=True).pool is held
