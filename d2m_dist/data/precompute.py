"""``d2m precompute``: run the frozen VAE and text encoders once, write precomputed shards.

Input: raw shards (``jpg|png|webp`` + caption, e.g. from ``d2m shards make``).
Output: one shard per input shard, with the same index, named
``{prefix}-{index:06d}.tar``; each sample keeps its input key and holds::

    latent.npy         [C, h, w] unpacked latent (pixels for the digits encoder)
    prompt_embeds.npy  [T, D] per-token text embeddings
    pooled.npy         [D] pooled text embedding
    txt                caption
    json               {"caption", "original_size": [h, w], "image_size": [H, W]}

which is :class:`~d2m_dist.data.decode.PrecomputedFormat`'s contract.

Distribution: under torch.distributed, input shard ``i`` goes to rank
``i % world_size``. A shard is encoded as a whole by one rank in a fixed order,
and (for ``latent_sampling=sample``) its noise is seeded by its index, so the
output does not depend on the world size: the bytes are identical for the same
batch_size, device and thread count. (Those three can move the last bits of the
embeddings: padding to the longest caption of a batch and the order of float
sums differ.)

Resume: a shard is written under a hidden temporary name, renamed when
complete, and then a ``{name}.done.json`` marker records its size, sample
count and the settings it was made with. Shard plus matching marker is a
finished shard and is not redone; temporaries of a crashed run are deleted by
the shard's owner on the next start. When every shard is finished, rank 0
writes ``{prefix}.manifest.json`` (the format of :mod:`d2m_dist.data.shards`),
so, as there, a folder with a manifest is complete. Two jobs must not write the
same ``out_dir`` at once.

Bad input: the raw stream skips and counts every sample that breaks a contract
(:mod:`d2m_dist.data.validate`; limits from this config, which are part of the
settings a finished shard must match); the counts are in each shard's marker
and summed in the manifest's ``skipped``. When more than
``max_skipped_fraction`` of all samples were skipped, the run fails with one
line and writes no manifest: the folder stays unfinished, its finished shards
kept, so a rerun with a higher fraction only writes the manifest.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from omegaconf import MISSING

from d2m_dist.config import ConfigError, Device, Dtype, choices
from d2m_dist.data.encoders import Encoder, EncoderSpec, encoder_spec
from d2m_dist.data.errors import DataError, SkipCounter, log
from d2m_dist.data.shards import (
    MANIFEST_SUFFIX,
    ShardInfo,
    ShardManifest,
    _atomic_write_text,
    brace_pattern,
    read_manifest,
    shard_name,
)
from d2m_dist.data.stream import (
    ShardStream,
    StreamConfig,
    derive_seed,
    expand_shard_urls,
)
from d2m_dist.data.validate import (
    DEFAULT_MAX_CAPTION_BYTES,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_SKIPPED_FRACTION,
    RawLimits,
    check_skipped_fraction,
    too_many_skipped,
)

DONE_SUFFIX = ".done.json"
STORAGE_DTYPES = ("float32", "float16")  # what .npy holds; numpy has no bfloat16
StorageDtype = choices("StorageDtype", *STORAGE_DTYPES)
LatentSampling = choices("LatentSampling", "mode", "sample")
_LATENT_NOISE = 4  # seed tag, apart from the stream's tags


@dataclass
class PrecomputeConfig:
    inputs: str = MISSING  # brace URL of raw shards: "data/raw/train-{000000..000099}.tar"
    out_dir: str = MISSING
    prefix: str = "train"  # output shards are {prefix}-{index:06d}.tar
    encoder: str = "digits"  # digits | flux (d2m_dist.data.encoders)
    model_path: Optional[str] = None  # flux: local pipeline folder with vae/, text_encoder(_2)/, tokenizer(_2)/
    batch_size: int = 16  # images per encoder call (per bucket)
    dtype: StorageDtype = StorageDtype("float32")  # stored arrays
    compute_dtype: Dtype = Dtype("fp32")  # encoder weights
    device: Device = Device("auto")  # auto: cuda when available; cuda: the rank's current device
    max_tokens: Optional[int] = None  # text length; None: 8 for digits, 512 (T5) for flux
    buckets: Optional[List[List[int]]] = None  # [[h, w], ...]; None: [[8, 8]] digits, [[1024, 1024]] flux
    latent_sampling: LatentSampling = LatentSampling("mode")  # mode: the VAE posterior mean | sample: a seeded draw
    seed: int = 0  # latent_sampling=sample: noise of shard i is seeded with (seed, i)
    overwrite: bool = False  # redo every shard, even finished ones made with other settings
    # Per-sample input limits (reasons for the defaults: d2m_dist.data.validate); over one: skipped, counted.
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_caption_bytes: int = DEFAULT_MAX_CAPTION_BYTES
    # Fail (no manifest) when more than this share of all input samples was skipped.
    max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        try:
            RawLimits.of(self)
            check_skipped_fraction(self.max_skipped_fraction)
        except DataError as exn:
            raise ConfigError(str(exn)) from None
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", self.prefix):
            raise ConfigError(f"prefix {self.prefix!r} must be letters, digits, '_' or '-' (no dots: webdataset keys)")


@dataclass
class PrecomputeResult:
    manifest: ShardManifest
    written: List[int] = field(default_factory=list)  # shard indices encoded by this run, all ranks
    reused: int = 0  # shards found finished and kept


def precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    """Encode ``cfg.inputs`` into ``cfg.out_dir`` on this rank's share of shards (see module docstring).

    Every rank must call it when torch.distributed is initialised; all return
    the same result. Configuration problems raise :class:`DataError` on every
    rank before anything is written.
    """
    cfg.validate()
    rank, world = _rank_world()
    inputs = expand_shard_urls(cfg.inputs)
    spec = encoder_spec(cfg.encoder, cfg.model_path, cfg.buckets, cfg.max_tokens, cfg.compute_dtype,
                        cfg.latent_sampling)
    # the limits decide which samples a shard holds: a finished shard must have been made with the same
    settings = {**spec.settings, "dtype": cfg.dtype, "input_limits": asdict(RawLimits.of(cfg))}
    if cfg.latent_sampling == "sample":
        settings["seed"] = cfg.seed
    device = _device(cfg.device)
    out = Path(cfg.out_dir)
    finished = _finished_shards(out, cfg.prefix, inputs, settings, cfg.overwrite)
    # Everyone has looked at the old state before anyone changes it.
    _barrier()
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / (cfg.prefix + MANIFEST_SUFFIX)
    mine = [i for i in range(len(inputs)) if i % world == rank]
    todo = [i for i in mine if i not in finished]
    for i in mine:
        _clean_temporaries(out, shard_name(cfg.prefix, i))
    if cfg.overwrite:
        _drop_markers(out, cfg.prefix, len(inputs), world, rank)
    if rank == 0:
        for tmp in out.glob(f".{manifest_path.name}.tmp*"):
            tmp.unlink(missing_ok=True)
        if len(finished) < len(inputs):  # the folder is not complete until the manifest is rewritten
            manifest_path.unlink(missing_ok=True)
    encoder: Optional[Encoder] = None
    for n, i in enumerate(todo, 1):
        if encoder is None:  # ranks with nothing left to do never load the models
            log.info("rank %d: loading the %s encoder on %s", rank, spec.kind, device)
            encoder = spec.build(device)
        t0 = time.perf_counter()
        info, skips = _encode_shard(inputs[i], out, shard_name(cfg.prefix, i), i, encoder, spec, cfg)
        _atomic_write_text(out / (info.name + DONE_SUFFIX), json.dumps(
            {"input": _canonical(inputs[i]), "settings": settings, "shard": asdict(info), "skipped": skips},
            indent=1, sort_keys=True))
        log.info("rank %d: %s done (%d/%d on this rank): %d samples in %.1f s", rank, info.name, n, len(todo),
                 info.samples, time.perf_counter() - t0)

    # Ranks that finish early wait here for the slowest: the process group's
    # timeout (NCCL's default is 10 min) must exceed that gap, about one shard.
    _barrier()
    problem = None
    if rank == 0:
        try:
            _write_manifest(out, cfg.prefix, len(inputs), manifest_path, cfg.max_skipped_fraction)
        except DataError as exn:  # raised on every rank below, not left to hang the others
            problem = str(exn)
    gathered = _all_gather((todo, problem))
    if gathered[0][1] is not None:
        raise DataError(gathered[0][1])
    written = sorted(i for part, _ in gathered for i in part)
    return PrecomputeResult(read_manifest(manifest_path), written, len(inputs) - len(written))


# ----------------------------------------------------------------------------- one shard


def _encode_shard(url: str, out: Path, name: str, index: int, encoder: Encoder, spec: EncoderSpec,
                  cfg: PrecomputeConfig):
    """Write output shard ``name`` from input ``url``; returns its ShardInfo and skip counts."""
    stream = ShardStream(StreamConfig(
        urls=url, kind="raw", rank=0, world_size=1, num_workers=0, batch_size=cfg.batch_size,
        shuffle_buffer=0, buckets=[list(b) for b in spec.buckets], image_format="uint8",
        max_image_pixels=cfg.max_image_pixels, max_image_bytes=cfg.max_image_bytes,
        max_caption_bytes=cfg.max_caption_bytes,
    ))
    # CPU generator: the same noise whichever device the VAE runs on
    generator = torch.Generator().manual_seed(derive_seed(_LATENT_NOISE, cfg.seed, index))
    tmp = out / f".{name}.tmp{os.getpid()}"
    samples = payload = 0
    try:
        # mtime=0: identical inputs give byte-identical shards (see shards._RotatingWriter)
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as tar:
            for batch in stream:
                latents, embeds, pooled = encoder.encode(batch["image"], batch["caption"], generator)
                image_size = list(batch["image"].shape[1:3])
                for j, key in enumerate(batch["key"]):
                    sample = _sample(key, batch["caption"][j], batch["original_size"][j].tolist(), image_size,
                                     latents[j], embeds[j], pooled[j], cfg.dtype)
                    tar.write(sample)
                    samples += 1
                    payload += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        with open(tmp, "rb") as fh:  # on disk before the rename makes it count as finished
            os.fsync(fh.fileno())
        os.replace(tmp, out / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ShardInfo(name, samples, (out / name).stat().st_size, payload), stream.skips.as_dict()


def _sample(key, caption: str, original_size, image_size, latent, embeds, pooled, dtype: str) -> Dict[str, Any]:
    meta = {"caption": caption, "original_size": [int(s) for s in original_size], "image_size": image_size}
    return {
        "__key__": key,
        "latent.npy": _npy(latent, dtype),
        "prompt_embeds.npy": _npy(embeds, dtype),
        "pooled.npy": _npy(pooled, dtype),
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _npy(t: torch.Tensor, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(t.detach().float().cpu().numpy().astype(dtype)), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------- resume bookkeeping


def _finished_shards(out: Path, prefix: str, inputs: List[str], settings: Dict[str, Any], overwrite: bool) -> set:
    """Indices whose shard and marker exist and match; DataError if ``out`` holds another set."""
    if overwrite or not out.is_dir():
        return set()
    finished = set()
    for path in sorted(out.glob(f"{prefix}-*.tar*")):
        index = _index_of(path.name.removesuffix(DONE_SUFFIX), prefix)
        if index is not None and index >= len(inputs):
            raise DataError(f"{out} holds {path.name}, beyond the {len(inputs)} input shards of this run; "
                            "set overwrite=true or choose another out_dir")
        if index is None or not path.name.endswith(DONE_SUFFIX):
            continue
        try:
            marker = json.loads(path.read_text())
            name, size = marker["shard"]["name"], marker["shard"]["bytes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # markers are written atomically: an unreadable one is not ours; redo the shard
        if marker.get("input") != _canonical(inputs[index]):
            raise DataError(f"{out} holds precomputed shards of other inputs ({path.name} is from "
                            f"{marker.get('input')!r}); set overwrite=true or choose another out_dir")
        if marker.get("settings") != settings:
            raise DataError(f"{out} holds shards precomputed with other settings ({marker.get('settings')} "
                            f"!= {settings}); set overwrite=true or choose another out_dir")
        shard = out / name
        if shard.is_file() and shard.stat().st_size == size:
            finished.add(index)
    return finished


def _drop_markers(out: Path, prefix: str, n: int, world: int, rank: int) -> None:
    """overwrite: this rank's markers go first (a crash then leaves its shards unfinished, not
    finished with old settings), and its share of shards beyond the input count goes entirely."""
    for path in out.glob(f"{prefix}-*.tar*"):
        index = _index_of(path.name.removesuffix(DONE_SUFFIX), prefix)
        if index is None or index % world != rank:
            continue
        if index >= n or path.name.endswith(DONE_SUFFIX):
            path.unlink(missing_ok=True)


def _clean_temporaries(out: Path, name: str) -> None:
    """Leftovers of a crashed run: the shard's and its marker's temporary files."""
    for tmp in out.glob(f".{name}.*tmp*"):
        log.info("removing %s, left by an interrupted run", tmp)
        tmp.unlink(missing_ok=True)


def _write_manifest(out: Path, prefix: str, n: int, path: Path, max_skipped_fraction: float) -> None:
    shards, skips = [], SkipCounter()
    for i in range(n):
        marker_path = out / (shard_name(prefix, i) + DONE_SUFFIX)
        if not marker_path.is_file():
            raise DataError(f"{marker_path} is missing after every rank finished: is another job writing {out}?")
        marker = json.loads(marker_path.read_text())
        shards.append(ShardInfo(**marker["shard"]))
        skips.merge(marker["skipped"])
    samples = sum(s.samples for s in shards)
    if too_many_skipped(skips.total, samples, max_skipped_fraction):
        raise DataError(f"{skips.total} of {skips.total + samples} input samples were skipped, more than "
                        f"max_skipped_fraction={max_skipped_fraction} allows ({skips.as_dict()}); no manifest written, "
                        f"{out} stays unfinished")
    manifest = ShardManifest(
        out_dir=str(out), pattern=brace_pattern(prefix, n), shards=shards,
        total_samples=sum(s.samples for s in shards), total_bytes=sum(s.bytes for s in shards),
        skipped=skips.as_dict(),
    )
    _atomic_write_text(path, json.dumps(manifest.to_json(), indent=1))
    log.info("precomputed %d samples in %d shards: %s", manifest.total_samples, n, manifest.url)


def _index_of(name: str, prefix: str) -> Optional[int]:
    m = re.fullmatch(re.escape(prefix) + r"-(\d{6})\.tar", name)
    return int(m.group(1)) if m else None


def _canonical(url: str) -> str:
    """Local paths compared as absolute paths; other URLs as written."""
    if url.startswith("file:") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url):
        return os.path.abspath(url.removeprefix("file:"))
    return url


# ----------------------------------------------------------------------------- distributed


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DataError("device=cuda but no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())
