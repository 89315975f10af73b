"""``d2m precompute``: world-size independence, resume, the FLUX encoders on tiny models, bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2m_dist.cli import main
from d2m_dist.data import precompute as precompute_mod
from d2m_dist.data.buckets import fit_to_bucket
from d2m_dist.data.errors import DataError
from d2m_dist.data.precompute import PrecomputeConfig, precompute
from d2m_dist.data.stream import ShardStream, StreamConfig
from d2m_dist.digits.data import digit_caption, load_digits_arrays
from d2m_dist.digits.text_encoder import encode_captions
from d2m_dist.models.sampling import uint8_to_unit

from ..distributed import run_ranks
from ..tiny import WORDS, save_tiny_flux_pipeline
from .conftest import png_bytes, write_tar


def _files(folder: Path):
    """{name: bytes} of everything a run leaves (shards, markers, manifest)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _read_back(url: str, batch_size: int = 8):
    """{key: batch row} of a precomputed set, read through the training stream."""
    stream = ShardStream(StreamConfig(urls=url, kind="precomputed", rank=0, world_size=1, num_workers=0,
                                      batch_size=batch_size, shuffle_buffer=0))
    rows = {}
    for batch in stream:
        for j, key in enumerate(batch["key"]):
            rows[key] = {k: (v[j] if torch.is_tensor(v) else v[j]) for k, v in batch.items()}
    assert stream.skips.total == 0
    return rows


def _precompute_on_rank(rank, world, inputs, out_dir):
    result = precompute(PrecomputeConfig(inputs=inputs, out_dir=out_dir, batch_size=4))
    assert result.written == list(range(8)) and result.reused == 0


# ----------------------------------------------------------------------------- digits


@pytest.mark.multiproc
def test_digits_one_and_two_ranks_write_identical_shards(digit_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # one rank in this process (no process group), with the ranks' thread count:
    # the same arithmetic, so the same bits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _precompute_on_rank(0, 1, digit_shards.url, str(one))
    finally:
        torch.set_num_threads(threads)
    run_ranks(_precompute_on_rank, 2, digit_shards.url, str(two))
    files = _files(one)
    shards = [f"train-{i:06d}.tar" for i in range(8)]
    assert sorted(files) == sorted(shards + [s + ".done.json" for s in shards] + ["train.manifest.json"])  # no temporaries
    assert files == _files(two)  # byte for byte, manifest and markers included

    manifest = json.loads(files["train.manifest.json"])
    assert manifest["total_samples"] == 40 and manifest["pattern"] == "train-{000000..000007}.tar"
    rows = _read_back(str(one / manifest["pattern"]))
    images, labels = load_digits_arrays()
    assert sorted(rows) == [f"{i:09d}" for i in range(40)]
    captions = [digit_caption(d) for d in range(10)]
    embeds, pooled = encode_captions(captions, 8)
    for key, row in rows.items():
        i = int(key)
        assert row["latent"].shape == (1, 8, 8) and row["latent"].dtype == torch.float32
        assert torch.equal(row["latent"][0], uint8_to_unit(images[i]))  # pixel space, [-1, 1], unchanged
        assert row["caption"] == captions[labels[i]]
        assert row["prompt_embeds"].shape == (8, 384) and row["pooled"].shape == (384,)
        torch.testing.assert_close(row["prompt_embeds"], embeds[labels[i]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(row["pooled"], pooled[labels[i]], rtol=1e-4, atol=1e-5)
        assert row["original_size"].tolist() == [8, 8]


def test_resume_redoes_only_the_missing_shard_and_cleans_temporaries(digit_shards, tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["precompute", f"inputs={digit_shards.url}", f"out_dir={out}", "batch_size=4"]) == 0
    assert "40 samples in 8 precomputed shards (8 encoded now, 0 already done)" in capsys.readouterr().out
    before = _files(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # what a SIGKILL mid-shard leaves: a finished-looking marker without its shard,
    # and half-written temporaries of the shard and of a marker
    (out / "train-000003.tar").unlink()
    (out / ".train-000003.tar.tmp4242").write_bytes(b"half a tar")
    (out / ".train-000005.tar.done.json.tmp4242").write_text("{")

    result = precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out), batch_size=4))
    assert result.written == [3] and result.reused == 7
    assert sorted(_files(out)) == sorted(before)  # temporaries gone
    for name, t in mtimes.items():
        if name not in ("train-000003.tar", "train-000003.tar.done.json", "train.manifest.json"):
            assert (out / name).stat().st_mtime_ns == t, f"{name} was rewritten"
    assert (out / "train-000003.tar").read_bytes() == before["train-000003.tar"]
    assert result.manifest.total_samples == 40


def test_a_failure_mid_run_leaves_no_partial_shard(digit_shards, tmp_path, monkeypatch):
    out = tmp_path / "pre"
    real = precompute_mod._sample
    calls = {"n": 0}

    def failing_sample(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # the third sample of shard 2 (5 samples per shard)
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(precompute_mod, "_sample", failing_sample)
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out)))
    assert sorted(p.name for p in out.iterdir()) == [
        "train-000000.tar", "train-000000.tar.done.json", "train-000001.tar", "train-000001.tar.done.json"]
    monkeypatch.setattr(precompute_mod, "_sample", real)
    result = precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out)))
    assert result.written == [2, 3, 4, 5, 6, 7] and result.manifest.total_samples == 40


def test_other_settings_need_overwrite(digit_shards, tmp_path):
    out = tmp_path / "pre"
    precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out)))
    with pytest.raises(DataError, match="other settings"):
        precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out), dtype="float16"))
    result = precompute(PrecomputeConfig(inputs=digit_shards.url, out_dir=str(out), dtype="float16", overwrite=True))
    assert result.written == list(range(8))
    row = next(iter(_read_back(result.manifest.url).values()))
    assert row["latent"].dtype == row["prompt_embeds"].dtype == row["pooled"].dtype == torch.float16


# ----------------------------------------------------------------------------- flux, tiny models

@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A FLUX-like pipeline folder with a tiny 16-channel VAE (8x down), T5 and CLIP (no transformer)."""
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("flux"), latent_channels=16, t5_width=16, clip_width=16)


def _flux_inputs(folder: Path) -> str:
    """Two raw shards of RGB images in two aspect ratios, and one broken sample."""
    sizes = [(40, 40), (30, 50), (32, 32), (36, 60), (50, 50)]
    for s in range(2):
        samples = []
        for i, (h, w) in enumerate(sizes):
            caption = " ".join(WORDS[(i + s + k) % len(WORDS)] for k in range(3 + i))
            samples.append({"__key__": f"{s}{i:03d}", "png": png_bytes(h, w, 10 * s + i), "txt": caption.encode()})
        if s == 1:  # skipped and counted, not fatal
            samples.append({"__key__": "1bad", "png": b"not a png", "txt": b"a cat"})
        write_tar(folder / f"raw-{s:06d}.tar", samples)
    return str(folder / "raw-{000000..000001}.tar")


def test_flux_latents_and_embeddings_equal_direct_encoder_calls(flux_dir, tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    inputs = _flux_inputs(tmp_path)
    buckets = [[32, 32], [32, 48]]
    cfg = PrecomputeConfig(inputs=inputs, out_dir=str(tmp_path / "pre"), encoder="flux", model_path=str(flux_dir),
                           batch_size=2, max_tokens=12, buckets=buckets)
    manifest = precompute(cfg).manifest
    assert manifest.total_samples == 10 and manifest.skipped == {"not_an_image": 1}
    rows = _read_back(manifest.url)

    vae = AutoencoderKL.from_pretrained(flux_dir / "vae").eval()
    pipe = FluxPipeline(scheduler=None, vae=vae, transformer=None,
                        text_encoder=CLIPTextModel.from_pretrained(flux_dir / "text_encoder").eval(),
                        tokenizer=AutoTokenizer.from_pretrained(flux_dir / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2").eval(),
                        tokenizer_2=AutoTokenizer.from_pretrained(flux_dir / "tokenizer_2"))
    keys = sorted(rows)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt([rows[k]["caption"] for k in keys], None, max_sequence_length=12)
    for n, key in enumerate(keys):
        row = rows[key]
        sample = _raw_sample(tmp_path, key)
        with Image.open(io.BytesIO(sample["png"])) as im:
            h, w = im.height, im.width
            bucket = (32, 32) if h == w else (32, 48)
            pixels = np.array(fit_to_bucket(im.convert("RGB"), bucket))
        x = uint8_to_unit(pixels).permute(2, 0, 1)[None]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        want = (z - vae.config.shift_factor) * vae.config.scaling_factor
        assert row["latent"].shape == (16, bucket[0] // 8, bucket[1] // 8)
        torch.testing.assert_close(row["latent"], want[0], rtol=1e-4, atol=1e-5)
        assert row["caption"] == sample["txt"].decode()
        assert row["original_size"].tolist() == [h, w]
        assert row["prompt_embeds"].shape == (12, 16) and row["pooled"].shape == (16,)
        torch.testing.assert_close(row["prompt_embeds"], embeds[n], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(row["pooled"], pooled[n], rtol=1e-4, atol=1e-5)

    # latent_sampling=sample: a seeded draw around the mode, the same on every run
    sampled = [PrecomputeConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / f"s{i}"), "latent_sampling": "sample"})
               for i in range(2)]
    a, b = (_read_back(precompute(c).manifest.url) for c in sampled)
    assert all(torch.equal(a[k]["latent"], b[k]["latent"]) for k in keys)
    assert not torch.equal(a[keys[0]]["latent"], rows[keys[0]]["latent"])


def _raw_sample(folder: Path, key: str):
    import tarfile

    with tarfile.open(folder / f"raw-{int(key[0]):06d}.tar") as t:
        return {ext: t.extractfile(f"{key}.{ext}").read() for ext in ("png", "txt")}


def test_flux_bucket_sides_must_fit_the_vae(flux_dir, tmp_path):
    inputs = _flux_inputs(tmp_path)
    cfg = PrecomputeConfig(inputs=inputs, out_dir=str(tmp_path / "pre"), encoder="flux", model_path=str(flux_dir),
                           buckets=[[32, 40]])
    with pytest.raises(DataError, match="multiples of 16"):
        precompute(cfg)
    assert not (tmp_path / "pre").exists()


# ----------------------------------------------------------------------------- bad input


def test_inputs_matching_no_shard_fail_before_any_output(tmp_path):
    out = tmp_path / "pre"
    with pytest.raises(DataError, match="match no existing shard"):
        precompute(PrecomputeConfig(inputs=str(tmp_path / "none-{000000..000003}.tar"), out_dir=str(out)))
    assert not out.exists()


@pytest.mark.parametrize("layout", ["missing", "no_t5"])
def test_missing_model_folder_is_one_line_naming_it(digit_shards, tmp_path, capsys, layout):
    model = tmp_path / "FLUX.1-dev"
    if layout == "no_t5":
        for sub in ("vae", "text_encoder", "tokenizer", "tokenizer_2"):
            (model / sub).mkdir(parents=True)
    out = tmp_path / "pre"
    rc = main(["precompute", f"inputs={digit_shards.url}", f"out_dir={out}", "encoder=flux", f"model_path={model}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("d2m: error: ")
    assert str(model) in err
    if layout == "no_t5":
        assert "text_encoder_2/" in err
    assert not out.exists()
