"""What a tester reported about hostile input, each reproduced (these failed before the input contracts).

1. ``d2m shards make`` on a folder with a 109 KB PNG declaring 30000 x 30000
   pixels died with PIL's DecompressionBombError; a 12000 x 12000 PNG passed
   and was decoded whole (13 s, +500 MB) to end up as 1 MP.
2. A precomputed sample whose ``prompt_embeds`` had the wrong width among good
   ones formed a batch of its own (samples are grouped by shape), reached the
   model (``mat1 and mat2 shapes cannot be multiplied``) and was counted nowhere.
3. A NaN in a latent reached the model: the trainer skipped whole steps as
   non-finite loss.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from d2m_dist.data.shards import ShardWriterConfig, make_shards
from d2m_dist.data.stream import ShardStream, StreamConfig
from d2m_dist.distill.batches import ShardBatches

from .conftest import SMALL_MODEL, png_bytes, precomputed_sample, write_tar


def test_a_decompression_bomb_in_shards_make_is_a_counted_skip(tmp_path, huge_pngs):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in (("bomb", huge_pngs["bomb"]), ("big", huge_pngs["big"]), ("a", png_bytes(8, 8, 1)),
                       ("b", png_bytes(8, 8, 2))):
        (src / f"{name}.png").write_bytes(data)
        (src / f"{name}.txt").write_text(f"caption {name}")
    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL must not be the one deciding
        manifest = make_shards(str(src), ShardWriterConfig(out_dir=str(tmp_path / "out")))
    assert manifest.skipped == {"image_too_large": 2}
    assert manifest.total_samples == 2
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # PIL's global guard is back as it was


def test_the_stream_refuses_huge_images_from_their_header(tmp_path, huge_pngs):
    url = write_tar(tmp_path / "raw-000000.tar", [
        {"__key__": "bomb", "png": huge_pngs["bomb"], "txt": b"bomb"},
        {"__key__": "big", "png": huge_pngs["big"], "txt": b"big"},
        {"__key__": "good", "png": png_bytes(8, 8, 3), "txt": b"good"},
    ])
    stream = ShardStream(StreamConfig(urls=str(url), rank=0, world_size=1, num_workers=0, buckets=[[8, 8]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        keys = [k for b in stream for k in b["key"]]
    assert keys == ["good"]
    assert stream.skips.as_dict() == {"image_too_large": 2}


def test_a_wrong_width_or_nan_among_good_samples_never_reaches_the_model(tmp_path):
    nan = np.ones((4, 2, 2), np.float32)
    nan[2, 1, 0] = np.nan
    samples = [precomputed_sample(f"g{i}", i) for i in range(8)]
    samples.insert(3, precomputed_sample("wide", 50, embeds=np.ones((3, 32), np.float32)))
    samples.insert(7, precomputed_sample("nan", 60, latent=nan))
    url = str(write_tar(tmp_path / "pre-000000.tar", samples))
    model_config = SimpleNamespace(**SMALL_MODEL)  # read by attribute, like the teacher's diffusers config
    source = ShardBatches(url, 4, 0, 1, 0, 0, None, model_config=model_config)
    draw = 0
    while source.stream.epoch == 0:  # the whole first epoch, and the first batch of the next
        inputs, target = source.get(draw)
        assert inputs.encoder_hidden_states.shape[-1] == SMALL_MODEL["joint_attention_dim"]
        assert torch.isfinite(inputs.hidden_states).all() and torch.isfinite(target).all()
        draw += 1
    counts = source.data_counts()
    assert counts["skipped/bad_shape"] >= 1 and counts["skipped/non_finite"] >= 1
