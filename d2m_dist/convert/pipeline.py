"""Stage 0: dense FLUX teacher -> portable MoE student folder.

Order of work, so that bad input fails before anything expensive runs:
validate config -> resolve every site's spec against the teacher's shapes ->
check the output folder -> load the teacher -> Taylor calibration (if the
strategy needs it; distributed when torch.distributed is up) -> partition and
router init -> surgery -> MoB -> atomic write (rank 0).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from d2m_dist.config import ConfigError, ConvertConfig, choice, to_dict
from d2m_dist.convert.partition import ROUTER_INITS, STRATEGIES, init_router, needs_scores, partition_site
from d2m_dist.convert.taylor import taylor_scores
from d2m_dist.models.flow import FlowBatch
from d2m_dist.models.flux import latent_image_ids, load_teacher
from d2m_dist.models.mob import apply_mob
from d2m_dist.models.portable import StudentMeta, full_state_dict, write_student
from d2m_dist.models.spec import select_sites
from d2m_dist.models.surgery import SitePartition, convert_to_moe, dense_ffn
from d2m_dist.parallel.dist import pick_device

log = logging.getLogger("d2m_dist.convert")

BatchSource = Callable[[object], Iterable[FlowBatch]]


def validate_convert_config(cfg: ConvertConfig) -> None:
    choice("partition.strategy", cfg.partition.strategy, STRATEGIES)
    choice("partition.router_init", cfg.partition.router_init, ROUTER_INITS)
    choice("calibration.source", cfg.calibration.source, ("random", "digits", "shards"))
    if cfg.calibration.source == "shards":
        from d2m_dist.data.errors import DataError
        from d2m_dist.data.stream import expand_shard_urls

        if not cfg.calibration.urls:
            raise ConfigError("calibration.urls must name the precomputed shards when calibration.source=shards")
        try:
            expand_shard_urls(cfg.calibration.urls)
        except DataError as exc:
            raise ConfigError(f"calibration: {exc}") from None
    choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if cfg.calibration.num_batches < 1 or cfg.calibration.batch_size < 1:
        raise ConfigError("calibration: num_batches and batch_size must be >= 1")


def random_batches(model_config, cfg) -> Iterator[FlowBatch]:
    """Gaussian latents and text embeddings of the teacher's shapes (smoke runs, tests)."""
    c = cfg.calibration
    side = int(round(c.image_tokens ** 0.5))
    if side * side != c.image_tokens:
        raise ConfigError(f"calibration.image_tokens={c.image_tokens} is not a square grid")
    for i in range(c.num_batches):
        g = torch.Generator().manual_seed(c.seed * 7919 + i)
        yield FlowBatch(
            latents=torch.randn(c.batch_size, c.image_tokens, model_config.in_channels, generator=g),
            prompt_embeds=torch.randn(c.batch_size, c.text_tokens, model_config.joint_attention_dim, generator=g),
            pooled=torch.randn(c.batch_size, model_config.pooled_projection_dim, generator=g),
            img_ids=latent_image_ids(side, side),
            txt_ids=torch.zeros(c.text_tokens, 3),
            guidance=torch.full((c.batch_size,), c.guidance) if model_config.guidance_embeds else None,
            index=i,
        )


def compute_partitions(teacher, specs, cfg: ConvertConfig, scores: Optional[Dict[str, torch.Tensor]]):
    gen = torch.Generator().manual_seed(cfg.partition.seed)
    parts: Dict[str, SitePartition] = {}
    for site, spec in specs.items():
        dense = dense_ffn(teacher, site)
        shape = spec.resolve(dense.dim, dense.hidden, site)
        cpu_dense = type(dense)(dense.w1.detach().cpu(), dense.b1.detach().cpu(), dense.w2.detach().cpu(), None)
        part = partition_site(
            shape, cfg.partition.strategy, scores=None if scores is None else scores[site],
            dense=cpu_dense, generator=gen, cluster_iters=cfg.partition.cluster_iters,
        )
        part.router = init_router(cpu_dense, part, cfg.partition.router_init, gen)
        parts[site] = part
    return parts


def run_convert(
    cfg: ConvertConfig,
    batches: Optional[Iterable[FlowBatch]] = None,
    *,
    group=None,
    progress: Optional[Callable[[int, float], None]] = None,
) -> Optional[Path]:
    """Convert; returns the output folder on the writing rank, None elsewhere.

    ``batches``: calibration batches, the same sequence on every rank (each scores its
    share); default: the source named in ``cfg.calibration``.
    """
    validate_convert_config(cfg)
    rank = dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"output {out} already exists (set overwrite=true to replace it)")

    # Shapes first (meta teacher: no weights read yet), so a bad spec fails in seconds.
    meta_teacher = load_teacher(cfg.teacher, meta=True)
    c = meta_teacher.config
    specs = select_sites(cfg.moe, c.num_layers, c.num_single_layers)
    for site, spec in specs.items():
        dense = dense_ffn(meta_teacher, site)
        spec.resolve(dense.dim, dense.hidden, site)
    apply_mob(convert_to_moe(meta_teacher, specs, cfg.moe), cfg.mob)
    del meta_teacher

    device = pick_device(cfg.device)
    scores = None
    t0 = time.time()
    if needs_scores(cfg.partition.strategy):
        scorer_model = load_teacher(cfg.teacher)
        if cfg.teacher_zero3:
            from d2m_dist.parallel.deepspeed_setup import zero3_inference_engine

            scorer_model = zero3_inference_engine(
                scorer_model.to(device), offload=cfg.teacher_offload, bf16=cfg.teacher.dtype == "bf16",
                micro_batch=cfg.calibration.batch_size, on_gpu=device.type == "cuda")
        else:
            scorer_model = scorer_model.to(device)
        if batches is None:
            batches = calibration_batches(scorer_model.module.config if cfg.teacher_zero3 else scorer_model.config, cfg)
        scorer = taylor_scores(scorer_model, batches, list(specs), seed=cfg.calibration.seed, group=group,
                               progress=progress)
        scores = scorer.scores
        del scorer_model
        log.info("taylor scores from %d calibration batches in %.1fs", scorer.batches, time.time() - t0)
    if rank != 0:
        return None
    teacher = load_teacher(cfg.teacher)  # whole weights, on CPU: the surgery copies rows and columns
    parts = compute_partitions(teacher, specs, cfg, scores)
    student = convert_to_moe(teacher, specs, cfg.moe, parts)
    apply_mob(student, cfg.mob)
    meta = StudentMeta(
        base_model={k: v for k, v in dict(teacher.config).items() if not k.startswith("_") or k == "_class_name"},
        moe=to_dict(cfg.moe),
        site_specs={s: str(sp) for s, sp in specs.items()},
        mob=to_dict(cfg.mob),
        dtype=cfg.teacher.dtype,
        extra={"stage": 0, "partition": to_dict(cfg.partition), "calibration": to_dict(cfg.calibration),
               "teacher": str(cfg.teacher.path)},
    )
    state = {k: v.cpu() for k, v in full_state_dict(student).items()}
    return write_student(out, state, meta, parts, overwrite=cfg.overwrite)


def shard_batches(model_config, cfg: ConvertConfig) -> Iterator[FlowBatch]:
    """The first ``num_batches`` batches of an unshuffled epoch over the precomputed shards.

    Every rank reads the same sequence (one reader, fixed order) and keeps its
    share by index, so the scores do not depend on the world size.
    """
    from d2m_dist.data.stream import fixed_order_stream
    from d2m_dist.distill.batches import check_batch_shapes, precomputed_flow_batch

    c = cfg.calibration
    stream = fixed_order_stream(c.urls, c.batch_size, seed=c.seed)
    guidance = c.guidance if model_config.guidance_embeds else None
    n = 0
    for b in stream:
        if n == c.num_batches:
            return
        batch = precomputed_flow_batch(b, guidance)
        if n == 0:
            check_batch_shapes(batch, model_config, f"calibration.urls {c.urls}")
        batch.index = n
        yield batch
        n += 1
    if n < c.num_batches:
        log.warning("calibration: the shards held %d batches of %d, fewer than num_batches=%d", n, c.batch_size,
                    c.num_batches)


def calibration_batches(model_config, cfg: ConvertConfig) -> Iterable[FlowBatch]:
    if cfg.calibration.source == "random":
        return random_batches(model_config, cfg)
    if cfg.calibration.source == "shards":
        return shard_batches(model_config, cfg)
    from d2m_dist.convert.digits_calibration import digits_batches

    return digits_batches(cfg.teacher.path, cfg.calibration)
