"""Precomputed samples (latents, text embeddings) decode to stacked tensors, grouped by shape."""

from __future__ import annotations

import io

import numpy as np
import torch
import webdataset as wds

from d2m_dist.data.stream import ShardStream, StreamConfig


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_precomputed_samples_decode_and_group_by_shape(tmp_path):
    rng = np.random.default_rng(0)
    want = {}
    with wds.TarWriter(str(tmp_path / "pre-000000.tar"), encoder=False, mtime=0) as w:
        for i in range(10):
            shape = (4, 2, 2) if i < 6 else (4, 2, 4)
            arrays = {
                "latent.npy": rng.standard_normal(shape).astype(np.float32),
                "prompt_embeds.npy": rng.standard_normal((3, 5)).astype(np.float16),
                "pooled.npy": rng.standard_normal(6).astype(np.float32),
            }
            want[f"p{i}"] = arrays
            w.write({"__key__": f"p{i}", **{k: npy(v) for k, v in arrays.items()}, "txt": f"cap {i}".encode(),
                     "json": b'{"original_size": [16, 32]}'})
        w.write({"__key__": "nopooled", "latent.npy": npy(np.zeros((4, 2, 2), np.float32)),
                 "prompt_embeds.npy": npy(np.zeros((3, 5), np.float16))})
        w.write({"__key__": "garbage", "latent.npy": b"not npy", "prompt_embeds.npy": b"x", "pooled.npy": b"y"})
    cfg = StreamConfig(urls=str(tmp_path / "pre-000000.tar"), kind="precomputed", rank=0, world_size=1,
                       num_workers=0, batch_size=4, shuffle_buffer=0)
    stream = ShardStream(cfg)
    seen = []
    for batch in stream:
        assert batch["latent"].shape[0] == len(batch["key"]) == len(batch["caption"])
        for j, key in enumerate(batch["key"]):
            for name in ("latent", "prompt_embeds", "pooled"):
                assert torch.equal(batch[name][j], torch.from_numpy(want[key][f"{name}.npy"]))
            assert batch["caption"][j] == f"cap {key[1:]}"
        assert batch["original_size"].tolist() == [[16, 32]] * len(batch["key"])
        seen += batch["key"]
    assert sorted(seen) == sorted(want)
    assert stream.skips.as_dict() == {"missing_field": 1, "bad_array": 1}
