"""Safetensors written one tensor at a time: byte-compatible with safetensors' own reader, sharded with an index."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from d2m_dist.ckpt.streaming import plan_shards, write_sharded, write_streamed
from d2m_dist.models.portable import read_state_dict


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.arange(4, dtype=torch.int64), "d": torch.randn(2, 2, 2, generator=g)}


def test_a_streamed_file_reads_back_with_safetensors(tmp_path):
    ts = _tensors()
    calls = []

    def produce(name):
        calls.append(name)
        return ts[name]

    write_streamed(tmp_path / "m.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()], produce,
                   {"format": "pt"})
    assert calls == list(ts)  # each tensor produced once, in order
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in ts.items())


def test_sharded_files_and_index(tmp_path):
    ts = _tensors()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    # 60 + 14 + 32 + 32 bytes: cut at 64 bytes -> [a], [b, c], [d]; a tensor over the limit gets a shard alone
    assert [[e[0] for e in s] for s in plan_shards(entries, 64)] == [["a"], ["b", "c"], ["d"]]
    assert [[e[0] for e in s] for s in plan_shards(entries, 10)] == [["a"], ["b"], ["c"], ["d"]]
    names = write_sharded(tmp_path, "model", entries, ts.__getitem__, 64, {"format": "pt"})
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 138 and index["weight_map"]["c"] == names[1]
    got = read_state_dict(tmp_path)
    assert got.keys() == ts.keys() and all(torch.equal(got[k], ts[k]) for k in ts)


def test_a_tensor_unlike_its_plan_is_refused(tmp_path):
    with pytest.raises(ValueError, match="a: produced torch.float32 \\(2,\\), planned torch.float32 \\(3,\\)"):
        write_streamed(tmp_path / "m.safetensors", [("a", torch.float32, (3,))], lambda n: torch.zeros(2), {})


def test_tensor_file_reads_whole_tensors_and_ranges_like_safetensors(tmp_path):
    from safetensors.torch import save_file

    from d2m_dist.ckpt.streaming import TensorFile

    ts = {**_tensors(), "e": torch.tensor([True, False, True])}
    save_file(ts, str(tmp_path / "m.safetensors"), metadata={"format": "x"})
    f = TensorFile(tmp_path / "m.safetensors")
    assert f.metadata == {"format": "x"} and sorted(f.keys()) == sorted(ts)
    assert all(torch.equal(f.read(k), v) and f.read(k).dtype == v.dtype for k, v in ts.items())
    assert torch.equal(f.read("a", 4, 7), ts["a"].reshape(-1)[4:11])
    assert torch.equal(f.read("b", 6, 1), ts["b"][6:])
    with pytest.raises(ValueError, match="range 5:9 outside its 7 elements"):
        f.read("b", 5, 4)


def test_tensor_file_refuses_what_is_not_safetensors(tmp_path):
    import pickle

    from d2m_dist.ckpt.streaming import TensorFile

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="bad header length"):
        TensorFile(bad)
    bad.write_bytes((4).to_bytes(8, "little") + b"abcd")
    with pytest.raises(ValueError, match="header is not JSON"):
        TensorFile(bad)
    header = b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)  # 8 of the 16 bytes
    with pytest.raises(ValueError, match="tensor a: dtype F32 or its byte range does not fit the file"):
        TensorFile(bad)
