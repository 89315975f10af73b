"""Hostile input: every bad sample is a counted skip under a named reason, in shards make, precompute and the stream.

(test_reported_facts.py holds the tester's reports.) Here: the precomputed
contract and the trainer's counts, each family of bad raw input, and one folder
of all of them going through ``shards make`` and ``precompute`` with exact counts.
"""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from d2m_dist.data.decode import PrecomputedContract
from d2m_dist.data.errors import DataError, SkipSample
from d2m_dist.data.precompute import PrecomputeConfig, precompute
from d2m_dist.data.precomputed_batch import check_shards_fit_model
from d2m_dist.data.shards import ShardWriterConfig, make_shards
from d2m_dist.data.stream import ShardStream, StreamConfig
from d2m_dist.data.validate import RawLimits, read_image_header
from d2m_dist.distill.batches import ShardBatches

from .conftest import SMALL_MODEL, npy_bytes, png_bytes, precomputed_sample, write_tar

# ----------------------------------------------------------------------------- helpers


def _image(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _frames(colours, fmt: str, **kw) -> bytes:
    """An animated image, one 8x8 frame per colour."""
    ims = [Image.new("RGB", (8, 8), c) for c in colours]
    return _image(ims[0], fmt, save_all=True, append_images=ims[1:], duration=100, **kw)


def _noise(h: int, w: int, fmt: str, seed: int = 0, **kw) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    return _image(Image.fromarray(arr), fmt, **kw)


def _cut(data: bytes) -> bytes:
    """The first half: the header parses, the pixel data ends early."""
    return data[: len(data) // 2]


def _precomputed_stream(url, **kw) -> ShardStream:
    base = dict(urls=str(url), kind="precomputed", rank=0, world_size=1, num_workers=0, batch_size=4,
                shuffle_buffer=0)
    return ShardStream(StreamConfig(**{**base, **kw}))


def _raw_stream(url, **kw) -> ShardStream:
    base = dict(urls=str(url), rank=0, world_size=1, num_workers=0, batch_size=4, buckets=[[8, 8]],
                shuffle_buffer=0, image_format="uint8")
    return ShardStream(StreamConfig(**{**base, **kw}))


def _tar_members(path: Path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


# ----------------------------------------------------------------------------- limits, NaN, wrong widths


def test_our_pixel_limit_decides_not_pils(huge_pngs):
    # above PIL's own error limit (179 MP) and accepted: the configured limit is what counts
    header = read_image_header(huge_pngs["bomb"], RawLimits(max_image_pixels=10**9))
    assert (header.width, header.height, header.format) == (30000, 30000, "PNG")
    # 12000 x 12000 is under PIL's error limit and refused by the default one (8192 x 8192)
    with pytest.raises(SkipSample, match="12000x12000") as info:
        read_image_header(huge_pngs["big"], RawLimits())
    assert info.value.reason == "image_too_large"


def _width_mix(folder: Path) -> str:
    """8 good samples and one with prompt_embeds 32 wide among them, in one shard."""
    samples = [precomputed_sample(f"g{i}", i) for i in range(8)]
    samples.insert(5, precomputed_sample("wide", 99, embeds=np.zeros((3, 32), np.float32)))
    return str(write_tar(folder / "pre-000000.tar", samples))


def test_a_wrong_width_among_good_samples_is_a_counted_skip(tmp_path):
    stream = _precomputed_stream(_width_mix(tmp_path), prompt_embeds_width=16)
    batches = list(stream)
    assert sorted(k for b in batches for k in b["key"]) == [f"g{i}" for i in range(8)]
    assert all(b["prompt_embeds"].shape[-1] == 16 for b in batches)
    assert stream.skips.as_dict() == {"bad_shape": 1}


def test_nan_and_inf_are_counted_skips(tmp_path):
    latent = np.ones((4, 2, 2), np.float32)
    latent[1, 0, 1] = np.nan
    pooled = np.ones(12, np.float16)
    pooled[3] = np.inf
    samples = [precomputed_sample("g0", 0), precomputed_sample("nan", 1, latent=latent), precomputed_sample("g1", 2),
               precomputed_sample("inf", 3, pooled=pooled), precomputed_sample("g2", 4)]
    url = write_tar(tmp_path / "pre-000000.tar", samples)
    stream = _precomputed_stream(url)
    batches = list(stream)
    assert sorted(k for b in batches for k in b["key"]) == ["g0", "g1", "g2"]
    assert all(torch.isfinite(b[n]).all() for b in batches for n in ("latent", "prompt_embeds", "pooled"))
    assert stream.skips.as_dict() == {"non_finite": 2}


# ----------------------------------------------------------------------------- the precomputed contract


def test_every_broken_array_is_skipped_under_its_reason(tmp_path):
    good = [precomputed_sample(f"g{i}", i) for i in range(6)]
    whole = npy_bytes(np.ones((4, 2, 2), np.float32))
    bad = [
        precomputed_sample("f64", latent=np.ones((4, 2, 2), np.float64)),
        precomputed_sample("int", pooled=np.ones(12, np.int32)),
        precomputed_sample("bigendian", embeds=np.ones((3, 16), ">f4")),
        precomputed_sample("flat", latent=np.ones((4, 4), np.float32)),  # [C, h, w] expected
        precomputed_sample("odd", latent=np.ones((4, 3, 2), np.float32)),  # 2x2 packing needs even sides
        precomputed_sample("notokens", embeds=np.ones((0, 16), np.float32)),
        precomputed_sample("channels", latent=np.ones((16, 2, 2), np.float32)),  # made for another VAE
        precomputed_sample("cut", latent=whole[:-8]),  # header intact, data short
        precomputed_sample("garbage", pooled=b"not npy"),
        precomputed_sample("unclosed", latent=whole.replace(b"(4, 2, 2)", b"(4, 2, 2 ")),  # numpy: TokenError
        precomputed_sample("sizes", json=b'{"original_size": "big"}'),
        precomputed_sample("jsonlist", json=b"[16, 16]"),
    ]
    del good[2]["pooled.npy"]  # missing member
    url = write_tar(tmp_path / "pre-000000.tar", good[:3] + bad + good[3:])
    stream = _precomputed_stream(url, latent_channels=4, prompt_embeds_width=16, pooled_width=12)
    keys = sorted(k for b in stream for k in b["key"])
    assert keys == ["g0", "g1", "g3", "g4", "g5"]
    assert stream.skips.as_dict() == {"bad_dtype": 3, "bad_shape": 4, "bad_array": 3, "bad_json": 2,
                                      "missing_field": 1}


def test_preflight_rejects_shards_for_another_model_in_one_line(tmp_path):
    good = write_tar(tmp_path / "good-000000.tar", [precomputed_sample("bad", 0, embeds=np.ones((3, 8), np.float32))]
                     + [precomputed_sample(f"g{i}", i) for i in range(3)])
    check_shards_fit_model(str(good), SMALL_MODEL)  # one bad first sample among good ones: not a verdict

    wide = write_tar(tmp_path / "wide-000000.tar", [precomputed_sample(f"w{i}", i, embeds=np.ones((3, 64), np.float32))
                                                    for i in range(6)])
    with pytest.raises(DataError, match=r"prompt_embeds.npy is \[3, 64\]: D = 64, the model takes 16") as info:
        check_shards_fit_model(str(wide), SMALL_MODEL)
    assert "\n" not in str(info.value) and "another model" in str(info.value)
    # (the stage start runs this check: tests/distill/test_trainer.py, case shards_for_another_model)

    raw = write_tar(tmp_path / "raw-000000.tar", [{"__key__": "r", "png": png_bytes(8, 8), "txt": b"a"}])
    with pytest.raises(DataError, match="missing_field"):
        check_shards_fit_model(str(raw), SMALL_MODEL)
    empty = write_tar(tmp_path / "empty-000000.tar", [])
    with pytest.raises(DataError, match="no sample could be read"):
        check_shards_fit_model(str(empty), SMALL_MODEL)


def _counted_set(folder: Path) -> str:
    """2 shards: 9 good samples, one 32 wide, one NaN latent."""
    nan = np.ones((4, 2, 2), np.float32)
    nan[0, 0, 0] = np.nan
    first = [precomputed_sample(f"a{i}", i) for i in range(4)] + [precomputed_sample("wide", 50, embeds=np.ones((3, 32), np.float32))]
    second = [precomputed_sample(f"b{i}", 10 + i) for i in range(5)] + [precomputed_sample("nan", 60, latent=nan)]
    write_tar(folder / "pre-000000.tar", first)
    write_tar(folder / "pre-000001.tar", second)
    return str(folder / "pre-{000000..000001}.tar")


def test_data_counts_are_totals_that_survive_resume_and_layout_changes(tmp_path):
    url = _counted_set(tmp_path)
    source = ShardBatches(url, 4, 0, 1, 0, 0, None, model_config=SMALL_MODEL)
    # 10 samples fit the contract's shapes: batches of 4, 4 and 2, the NaN one dropped from its batch
    for draw in range(3):
        inputs, _ = source.get(draw)
        assert inputs.encoder_hidden_states.shape[-1] == 16 and inputs.hidden_states.shape[-1] == 16
        assert torch.isfinite(inputs.hidden_states).all()
    want = {"samples": 9, "skipped": 2, "skipped/bad_shape": 1, "skipped/non_finite": 1}
    assert source.data_counts() == want

    state = source.state_dict()
    resumed = ShardBatches(url, 4, 0, 1, 0, 0, None, model_config=SMALL_MODEL)
    resumed.load_state_dict(state)
    assert resumed.data_counts() == want
    # two ranks continue one: rank 0 carries the old totals, rank 1 starts at none; the sum is the run's
    ranks = [ShardBatches(url, 4, r, 2, 0, 0, None, model_config=SMALL_MODEL) for r in (0, 1)]
    for r in ranks:
        r.load_elastic_state([state])
    assert ranks[0].data_counts() == want
    assert ranks[1].data_counts() == {"samples": 0, "skipped": 0}
    # the next epoch's skips add up
    for draw in range(3, 6):
        source.get(draw)
    assert source.data_counts() == {"samples": 18, "skipped": 4, "skipped/bad_shape": 2, "skipped/non_finite": 2}


def test_fixed_evaluation_batches_fit_the_model(tmp_path):
    source = ShardBatches(_counted_set(tmp_path), 4, 0, 1, 0, 0, None, model_config=SMALL_MODEL)
    for i in range(3):
        inputs, _ = source.fixed(i)
        assert inputs.encoder_hidden_states.shape[-1] == 16 and torch.isfinite(inputs.hidden_states).all()


def test_contract_from_a_model_config_in_either_form():
    class AttrConfig:  # diffusers' FrozenDict config reads by attribute
        in_channels, joint_attention_dim, pooled_projection_dim = 64, 4096, 768

    assert PrecomputedContract.for_model(AttrConfig()) == PrecomputedContract(16, 4096, 768)
    assert PrecomputedContract.for_model(SMALL_MODEL) == PrecomputedContract(4, 16, 12)


# ----------------------------------------------------------------------------- raw samples in the stream


def test_image_modes_decode_to_8_bit_rgb_with_white_behind_transparency(tmp_path):
    grey16 = Image.fromarray(np.full((8, 8), 0x8000, np.uint16))  # mode I;16: half of full scale
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] * 256)  # every index red, index 0 transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 16 wide and 8 high, shown rotated: 8 wide, 16 high
    rotated = Image.new("RGB", (16, 8), (0, 0, 0))
    rotated.paste((255, 255, 255), (0, 0, 8, 8))  # the left half white: the top after rotating
    cases = {
        "grey16": (_image(grey16, "PNG"), (128, 128, 128)),
        "cmyk": (_image(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"), (255, 255, 255)),
        "palette": (_image(palette, "PNG", transparency=0), (255, 255, 255)),
        "la": (_image(Image.new("LA", (8, 8), (0, 0)), "PNG"), (255, 255, 255)),
        "rgba": (_image(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG"), (255, 255, 255)),
        "half": (_image(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"), (127, 127, 127)),
        "onebit": (_image(Image.new("1", (8, 8), 1), "PNG"), (255, 255, 255)),
        "webp": (_frames([(255, 0, 0), (0, 0, 255)], "WEBP", lossless=True), (255, 0, 0)),  # first frame
        "apng": (_frames([(255, 0, 0), (0, 0, 255)], "PNG"), (255, 0, 0)),
    }
    samples = [{"__key__": k, "webp" if k == "webp" else "png": data, "txt": k.encode()}
               for k, (data, _) in cases.items()]
    samples.append({"__key__": "rotated", "jpg": _image(rotated, "JPEG", exif=exif, quality=95), "txt": b"r"})
    stream = _raw_stream(write_tar(tmp_path / "raw-000000.tar", samples), buckets=[[8, 8], [16, 8]])
    pixels, sizes = {}, {}
    for batch in stream:
        for j, key in enumerate(batch["key"]):
            pixels[key] = batch["image"][j].to(torch.int16)
            sizes[key] = batch["original_size"][j].tolist()
    assert stream.skips.total == 0
    for key, (_, rgb) in cases.items():
        assert (pixels[key] - torch.tensor(rgb, dtype=torch.int16)).abs().max() <= 2, key
    assert sizes["rotated"] == [16, 8] and pixels["rotated"].shape == (16, 8, 3)
    assert pixels["rotated"][:8].min() > 200 and pixels["rotated"][8:].max() < 50


def test_bad_raw_samples_are_counted_by_reason(tmp_path):
    png = png_bytes(8, 8, 5)
    samples = [
        {"__key__": "good", "png": png, "txt": b"a good caption"},
        {"__key__": "pngasjpg", "jpg": png, "txt": b"png bytes in a jpg member"},
        {"__key__": "nulpadded", "png": png, "txt": b"padded\x00\x00\x00"},
        {"__key__": "bom", "png": png, "txt": b"\xef\xbb\xbfwith a byte-order mark"},
        {"__key__": "fromjson", "png": png, "txt": b"  ", "json": b'{"caption": "from json"}'},
        {"__key__": "gif", "png": _frames([(1, 2, 3)], "GIF"), "txt": b"gif content"},
        {"__key__": "cutpng", "png": _cut(_noise(16, 16, "PNG")), "txt": b"cut png"},
        {"__key__": "cutjpg", "jpg": _cut(_noise(64, 64, "JPEG")), "txt": b"cut jpeg"},
        {"__key__": "latin1", "png": png, "txt": "café".encode("latin-1")},
        {"__key__": "blank", "png": png, "txt": b" \n\t "},
        {"__key__": "nul", "png": png, "txt": b"\x00\x00"},
        {"__key__": "empty", "png": png, "txt": b""},
        {"__key__": "jsonlist", "png": png, "txt": b"a caption", "json": b"[1, 2]"},
        {"__key__": "jsonbroken", "png": png, "txt": b"a caption", "json": b"{not json"},
        {"__key__": "numcaption", "png": png, "json": b'{"caption": 42}'},
        {"__key__": "surrogate", "png": png, "json": b'{"caption": "\\udcff"}'},  # no UTF-8 text holds it
        {"__key__": "long", "png": png, "txt": b"x" * 101},
        {"__key__": "heavy", "png": _noise(64, 64, "PNG"), "txt": b"too many bytes"},
        # "img.v2.png": webdataset keys it "img" with members "v2.png" and "v2.txt"
        {"__key__": "img", "v2.png": png, "v2.txt": b"dotted"},
    ]
    stream = _raw_stream(write_tar(tmp_path / "raw-000000.tar", samples), max_caption_bytes=100,
                         max_image_bytes=4000)
    captions = {k: c for b in stream for k, c in zip(b["key"], b["caption"])}
    assert captions == {"good": "a good caption", "pngasjpg": "png bytes in a jpg member", "nulpadded": "padded",
                        "bom": "with a byte-order mark", "fromjson": "from json"}
    assert stream.skips.as_dict() == {
        "unsupported_format": 1, "corrupt_image": 2, "caption_not_utf8": 2, "missing_caption": 3, "bad_json": 2,
        "caption_not_text": 1, "caption_too_long": 1, "file_too_large": 1, "dotted_key": 1}


def test_upper_case_member_names_are_read(tmp_path):
    url = write_tar(tmp_path / "raw-000000.tar", [{"__key__": "k", "PNG": png_bytes(8, 8), "TXT": b"upper"}])
    stream = _raw_stream(url)
    assert [b["caption"] for b in stream] == [["upper"]] and stream.skips.total == 0


# ----------------------------------------------------------------------------- a hostile folder, end to end


def _hostile_folder(root: Path, huge_pngs) -> dict:
    """Every kind of bad input beside good ones. Returns {file name: caption} of the files that must
    reach the shards (all of them good but cutjpg.jpg, whose pixel data only the decoder finds cut)."""
    root.mkdir()
    rgb = png_bytes(8, 8, 7)
    grey16 = _image(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG")
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0] * 256)
    good = {
        "good.png": rgb,
        "UPPER.PNG": png_bytes(8, 8, 8),
        "cmyk.jpg": _image(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG"),
        "grey16.png": grey16,
        "palette.png": _image(palette, "PNG", transparency=0),
        "la.png": _image(Image.new("LA", (8, 8), (90, 128)), "PNG"),
        "rgba.png": _image(Image.new("RGBA", (8, 8), (10, 200, 30, 255)), "PNG"),
        "onebit.png": _image(Image.new("1", (8, 8), 1), "PNG"),
        "animated.webp": _frames([(255, 0, 0), (0, 0, 255)], "WEBP", lossless=True),
        "apng.png": _frames([(0, 255, 0), (0, 0, 255)], "PNG"),
        "png_named.jpg": png_bytes(8, 8, 9),
        "big_but_fine.jpg": _noise(64, 96, "JPEG"),
        "cutjpg.jpg": _cut(_noise(64, 64, "JPEG", quality=95)),
    }
    captions = {name: f"a picture called {name}" for name in good}
    captions["nulpadded.png"] = "nul padded"
    good["nulpadded.png"] = rgb
    for name, data in good.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_bytes(captions[name].encode() + (b"\x00\x00" if "nul" in name else b""))
    (root / "fromjson.png").write_bytes(rgb)
    (root / "fromjson.json").write_text(json.dumps({"caption": "caption from json", "score": 1}))
    captions["fromjson.png"] = "caption from json"

    bad = {  # name: (bytes, txt sidecar or None)
        "bomb.png": (huge_pngs["bomb"], b"bomb"),  # image_too_large
        "big.png": (huge_pngs["big"], b"big"),  # image_too_large
        "noise.png": (_noise(256, 256, "PNG"), b"noise"),  # file_too_large (197 KB; the bomb is 109 KB)
        "anim.gif": (_frames([(1, 2, 3), (4, 5, 6)], "GIF"), b"gif"),  # unsupported_format (extension)
        "pic.bmp": (_image(Image.new("RGB", (8, 8)), "BMP"), b"bmp"),  # unsupported_format (extension)
        "gif_named.png": (_frames([(1, 2, 3)], "GIF"), b"gif"),  # unsupported_format (content)
        "text.png": (b"these bytes are no image", b"text"),  # not_an_image
        "empty.png": (b"", b"empty"),  # empty_image
        "cutpng.png": (_cut(_noise(32, 32, "PNG")), b"cut"),  # corrupt_image (chunks end early)
        "nocaption.png": (rgb, None),  # missing_caption
        "blank.png": (rgb, b" \n "),  # missing_caption
        "nul.png": (rgb, b"\x00\x00"),  # missing_caption
        "latin1.png": (rgb, "café".encode("latin-1")),  # caption_not_utf8
        "long.png": (rgb, b"y" * 2000),  # caption_too_long
    }
    for name, (data, txt) in bad.items():
        (root / name).write_bytes(data)
        if txt is not None:
            (root / name).with_suffix(".txt").write_bytes(txt)
    for name, sidecar in (("jsonlist.png", "[1, 2]"), ("jsonbroken.png", "{not json"),  # bad_json
                          ("numcaption.png", '{"caption": 42}'),  # caption_not_text
                          ("surrogate.png", '{"caption": "\\udcff"}')):  # caption_not_utf8 (a lone surrogate)
        (root / name).write_bytes(rgb)
        (root / name).with_suffix(".json").write_text(sidecar)
    return captions


SHARDS_MAKE_SKIPS = {"image_too_large": 2, "file_too_large": 1, "unsupported_format": 3, "not_an_image": 1,
                     "empty_image": 1, "corrupt_image": 1, "missing_caption": 3, "caption_not_utf8": 2,
                     "caption_too_long": 1, "bad_json": 2, "caption_not_text": 1}  # 18 of 33 inputs


def test_a_hostile_folder_through_shards_make_and_precompute(tmp_path, huge_pngs):
    captions = _hostile_folder(tmp_path / "src", huge_pngs)
    limits = dict(max_image_bytes=150_000, max_caption_bytes=1000)
    out = tmp_path / "raw"
    # 18 of 33 skipped is over the default max_skipped_fraction of 0.5: one line, nothing written, and
    # written as soon as the 17th skip makes it certain
    with pytest.raises(DataError, match=r"^17 of 33 input samples are skipped already, more than "
                                        r"max_skipped_fraction=0.5 allows \(\{.*\}\); nothing was written$"):
        make_shards(str(tmp_path / "src"), ShardWriterConfig(out_dir=str(out), **limits))
    assert not out.exists()

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        raw = make_shards(str(tmp_path / "src"), ShardWriterConfig(out_dir=str(out), max_samples=4,
                                                                   max_skipped_fraction=0.6, **limits))
    assert raw.skipped == SHARDS_MAKE_SKIPS
    members = {}
    for shard in raw.shards:
        members.update(_tar_members(out / shard.name))
    written = {json.loads(v)["source"]: k.split(".")[0] for k, v in members.items() if k.endswith(".json")}
    assert sorted(written) == sorted(captions)
    key_of = {source: key for source, key in written.items()}
    assert f"{key_of['png_named.jpg']}.png" in members  # stored by content
    assert members[f"{key_of['nulpadded.png']}.txt"] == b"nul padded"

    # precompute decodes: the cut JPEG is found there; 0.0 tolerates no skip at all
    pre = tmp_path / "pre"
    with pytest.raises(DataError, match=r"1 of 15 input samples were skipped"):
        precompute(PrecomputeConfig(inputs=raw.url, out_dir=str(pre), batch_size=4, max_skipped_fraction=0.0))
    assert not (pre / "train.manifest.json").exists()
    result = precompute(PrecomputeConfig(inputs=raw.url, out_dir=str(pre), batch_size=4))
    assert result.reused == len(raw.shards) and result.written == []  # only the manifest was missing
    assert result.manifest.skipped == {"corrupt_image": 1}
    stream = _precomputed_stream(result.manifest.url, latent_channels=1, prompt_embeds_width=384, pooled_width=384)
    arrived = {k: c for b in stream for k, c in zip(b["key"], b["caption"])}
    assert stream.skips.total == 0
    assert arrived == {key_of[name]: caption for name, caption in captions.items() if name != "cutjpg.jpg"}


def test_a_source_of_unknown_length_is_judged_when_it_ends(tmp_path):
    from d2m_dist.data.shards import write_shards
    from d2m_dist.digits.data import scan_digits

    records = scan_digits(limit=4)
    records[1].data = records[3].data = b"junk"
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"^2 of 4 input samples are skipped, more than max_skipped_fraction=0.25"):
        write_shards((r for r in records), ShardWriterConfig(out_dir=str(out), max_samples=1,
                                                             max_skipped_fraction=0.25))
    assert not out.exists()  # two shards were written before the end: removed with the folder


def test_table_rows_with_unusable_images_or_captions_are_counted(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(8, 8, 1))
    (tmp_path / "b.bmp").write_bytes(_image(Image.new("RGB", (8, 8)), "BMP"))
    rows = [{"image": "a.png", "caption": "fine"}, {"image": "a.png", "caption": 7},
            {"image": "b.bmp", "caption": "bitmap"}, {"image": "a.png", "caption": "z" * 50}]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    m = make_shards(str(tmp_path / "t.jsonl"), ShardWriterConfig(out_dir=str(tmp_path / "o"), max_caption_bytes=40,
                                                                 max_skipped_fraction=1.0))
    assert m.total_samples == 1
    assert m.skipped == {"caption_not_text": 1, "unsupported_format": 1, "caption_too_long": 1}


@pytest.mark.parametrize("field, value", [("max_image_pixels", 0), ("max_caption_bytes", -1),
                                          ("max_skipped_fraction", 1.5)])
def test_limits_out_of_range_are_config_errors(tmp_path, field, value):
    from d2m_dist.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        make_shards("digits", ShardWriterConfig(out_dir=str(tmp_path / "o"), **{field: value}))
    with pytest.raises(ConfigError, match=field):
        PrecomputeConfig(inputs="x", out_dir="y", **{field: value}).validate()
    assert not (tmp_path / "o").exists()


def test_the_digits_source_counts_what_it_hands_out(tmp_path):
    from d2m_dist.digits.batches import DigitsBatches

    ranks = [DigitsBatches(str(tmp_path), 4, rank, 2, 0) for rank in (0, 1)]  # no card: the default teacher
    for draw in range(3):
        for r in ranks:
            r.get(draw)
    assert [r.data_counts() for r in ranks] == [{"samples": 12, "skipped": 0}] * 2
    resumed = DigitsBatches(str(tmp_path), 4, 0, 2, 0)
    resumed.load_state_dict(ranks[0].state_dict())
    assert resumed.data_counts() == {"samples": 12, "skipped": 0}
    one = DigitsBatches(str(tmp_path), 8, 0, 1, 0)  # another layout: the old ranks' totals go to rank 0
    one.load_elastic_state([r.state_dict() for r in ranks])
    assert one.data_counts() == {"samples": 24, "skipped": 0}
    one.load_state_dict({})  # a checkpoint from before the count was kept
    assert one.data_counts() == {"samples": 0, "skipped": 0}
