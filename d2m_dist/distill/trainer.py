"""The stage trainer (stages 1-3): student under DeepSpeed, frozen teacher, distillation losses.

One class for every stage; the stage's recipe (``distill/stages.py``, with the
config's overrides) decides what trains, at which top-k, with which losses and
at which ZeRO stage (docs/ARCHITECTURE.md): stage 1 under ZeRO-3, stages 2-3
with expert parallelism plus ZeRO-2; the teacher plain or as a ZeRO-3 inference
engine (optionally offloaded to CPU).

Order of work: everything a user can get wrong is checked before the first
expensive step (init folder, teacher/student agreement, ep_size and world size);
then the engine is built, the latest checkpoint (if any) loaded, and the loop
runs until ``steps``, a signal, or too many skipped (non-finite) steps in a row.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from d2m_dist.ckpt.checkpoint import CheckpointDir
from d2m_dist.ckpt.export import ExportedStateReader
from d2m_dist.config import ConfigError, StageConfig, to_dict
from d2m_dist.data.errors import DataError
from d2m_dist.data.precomputed_batch import check_shards_fit_model
from d2m_dist.data.stream import expand_shard_urls
from d2m_dist.distill import losses as L
from d2m_dist.distill.batches import BATCH_SOURCES, make_batches
from d2m_dist.distill.ema import StudentEMA
from d2m_dist.distill.metrics import block_usage, expert_load, flatten_metrics
from d2m_dist.distill.resume import export_plan, load_checkpoint, save_checkpoint
from d2m_dist.distill.stages import (
    StageRecipe,
    apply_recipe_to_student,
    routers_train,
    stage_recipe,
)
from d2m_dist.distill.taps import tap_points, tapped
from d2m_dist.distill.teacher import FrozenTeacher
from d2m_dist.distill.teacher_kinds import GridRequest, default_guidance, teacher_kind
from d2m_dist.distill.tracking import Tracker
from d2m_dist.eval import flux_samples as fs
from d2m_dist.models.diffusers_student import diffusers_folder, write_diffusers_student
from d2m_dist.models.flux import call_flux, load_flux_config, parse_dtype
from d2m_dist.models.mob import MoBGroup, apply_mob, mob_groups
from d2m_dist.models.moe import clear_routing_stats, moe_layers
from d2m_dist.models.portable import (
    StudentMeta,
    build_student_skeleton,
    load_student_weights,
    read_provenance,
    to_storage_dtype,
    write_student,
)
from d2m_dist.models.precision import bf16_autocast
from d2m_dist.models.sampling import SamplerConfig
from d2m_dist.models.spec import MoESpec
from d2m_dist.models.teacher_identity import check_teacher_weights, teacher_fingerprint
from d2m_dist.parallel import deepspeed_setup as dss
from d2m_dist.parallel.comm_timing import COMM_CLOCK
from d2m_dist.parallel.dist import DistInfo, any_true, init_distributed
from d2m_dist.parallel.expert_parallel import apply_expert_parallel
from d2m_dist.runtime.run_lock import take_run_lock
from d2m_dist.runtime.watchdog import start_parent_watchdog

log = logging.getLogger("d2m_dist.train")

EXIT_OK = 0
EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM/SIGUSR1: run the same command to resume
EXIT_DIVERGED = 4  # too many non-finite losses in a row: a diagnostic checkpoint was written

ARCH_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
             "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "patch_size")


# ----------------------------------------------------------------------------- checks before any work


def auto_ep_size(world: int, meta: StudentMeta, zero_stage: int) -> int:
    """``parallel.ep_size: 0``: the largest size dividing the world and every site's expert count."""
    if zero_stage == 3:
        return 1  # DeepSpeed refuses its MoE under ZeRO-3
    counts = [MoESpec.parse(text).num_experts for text in meta.site_specs.values()]
    return max(d for d in range(1, world + 1) if world % d == 0 and all(n % d == 0 for n in counts))


def check_inputs(cfg: StageConfig, world: int) -> Tuple[StudentMeta, StageRecipe]:
    recipe = stage_recipe(cfg)
    init = Path(cfg.init)
    if not init.is_dir():
        raise ConfigError(f"init: student folder {init} not found (run the previous stage first)")
    meta = StudentMeta.read(init)
    teacher_cfg = load_flux_config(cfg.teacher.path)
    for key in ARCH_KEYS:
        a, b = teacher_cfg.get(key), meta.base_model.get(key)
        if a is not None and b is not None and a != b:
            raise ConfigError(f"teacher {cfg.teacher.path} and student {init} disagree on {key}: {a} vs {b}")
    check_teacher_weights(cfg.teacher.path, teacher_cfg)
    _check_provenance(cfg, meta)
    if cfg.parallel.ep_size == 0:
        cfg.parallel.ep_size = auto_ep_size(world, meta, recipe.zero_stage)
    ep = cfg.parallel.ep_size
    if world % ep:
        raise ConfigError(f"parallel.ep_size={ep} does not divide the world size {world}")
    for site, text in meta.site_specs.items():
        n = MoESpec.parse(text).num_experts
        if n % ep:
            raise ConfigError(f"parallel.ep_size={ep} does not divide the {n} experts of site {site}")
    if cfg.data.source not in BATCH_SOURCES:
        raise ConfigError(f"data.source: '{cfg.data.source}' is not one of {', '.join(sorted(BATCH_SOURCES))}")
    if cfg.data.source == "shards":
        try:
            expand_shard_urls(cfg.data.urls)
            check_shards_fit_model(cfg.data.urls, teacher_cfg)  # data made for another model: one line, now
        except DataError as exc:
            raise ConfigError(str(exc)) from None
    if recipe.mob and not meta.mob.get("enabled") and not cfg.mob.enabled:
        raise ConfigError(f"stage {cfg.stage} needs Mixture-of-Blocks groups: set mob.enabled=true and "
                          f"mob.double/mob.single")
    if cfg.mob.enabled and meta.mob.get("enabled") and to_dict(cfg.mob) != meta.mob:
        raise ConfigError(f"mob: the student {init} already has Mixture-of-Blocks groups ({meta.mob}); "
                          f"leave mob.enabled=false to train them")
    if cfg.mob.enabled and not recipe.mob:
        raise ConfigError(f"mob: stage {cfg.stage} trains with every block on; Mixture of Blocks starts in stage 3")
    return meta, recipe


def _check_provenance(cfg: StageConfig, meta: StudentMeta) -> None:
    """The init was converted from this teacher (the fingerprint ``d2m convert`` recorded)."""
    recorded = meta.extra.get("teacher_fingerprint")
    if recorded is None:
        log.warning("init %s records no teacher fingerprint (converted by an older d2m): it cannot be checked "
                    "to come from teacher.path %s", cfg.init, cfg.teacher.path)
        return
    found = teacher_fingerprint(cfg.teacher.path)
    if found != recorded:
        raise ConfigError(f"init {cfg.init} was converted from another teacher (fingerprint {recorded}) than "
                          f"teacher.path {cfg.teacher.path} ({found}): train with the teacher it was converted "
                          f"from, or convert again")


# ----------------------------------------------------------------------------- the trainer


class StageTrainer:
    def __init__(self, cfg: StageConfig):
        start_parent_watchdog()  # under torchrun or srun: exit when the launcher dies (docs/DECISIONS.md)
        self.cfg = cfg
        # user errors first: before process groups, DeepSpeed or any weights
        self.meta, self.recipe = check_inputs(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.ckpt = CheckpointDir(Path(cfg.run_dir) / f"stage{cfg.stage}" / "checkpoints", cfg.ckpt.keep)
        # the checkpoint to resume (every file's header checked), or the exported state to start from
        self._reader = self.ckpt.open() or (ExportedStateReader(cfg.init) if cfg.ckpt.init_state else None)
        self.info: DistInfo = init_distributed(cfg.device)
        self.stage_dir = Path(cfg.run_dir) / f"stage{cfg.stage}"
        # one writer per run folder, refused alike on every rank before any engine is built
        self.run_lock = take_run_lock(cfg.run_dir, f"d2m train (stage {cfg.stage})")
        if self.info.is_main:  # crashed saves' folders (the lock says no other job is writing them)
            self.ckpt.remove_temporaries()
            CheckpointDir(self.stage_dir / "diagnostic").remove_temporaries()
        self.device = self.info.device
        torch.manual_seed(cfg.seed)

        # the student in explicit steps: built on the meta device with every expert; split over the
        # expert-parallel group (this rank's experts, all-to-all dispatch); filled from its folder
        # (each rank reads only its own experts' rows), fp32 master weights whatever the storage dtype
        self.ep_group = ep_group = dss.expert_group(cfg.parallel.ep_size)
        student = build_student_skeleton(self.meta, meta_device=True)
        apply_expert_parallel(student, ep_group)
        student = load_student_weights(student, cfg.init, dtype=torch.float32)
        init_names = {id(p): name for name, p in student.named_parameters()}  # before MoB groups rename blocks
        self.mob_added = cfg.mob.enabled and not mob_groups(student)
        if self.mob_added:
            apply_mob(student, cfg.mob)
        n_train = apply_recipe_to_student(student, self.recipe)
        self.trainable = list(self.recipe.trainable)
        self.aux_losses = routers_train(student)
        self.engine = dss.student_engine(student.to(self.device), cfg, self.info, self.recipe.zero_stage)
        self.student = self.engine.module
        self.export_plan = export_plan(self.student, init_names, parse_dtype(self.meta.dtype))
        self.ema = StudentEMA(self.student, cfg.ema.decay, ep_group) if cfg.ema.enabled else None
        self.teacher = FrozenTeacher(cfg.teacher, self.device, autocast_bf16=dss.use_bf16(cfg, self.info),
                                     micro_batch=cfg.data.batch_size)
        guidance = cfg.data.guidance if cfg.data.guidance is not None else default_guidance(cfg.teacher.path)
        self.batches = make_batches(cfg, self.info, self.teacher.config, guidance)
        self.step = 0
        # step attempts so far, applied or skipped: it picks the batches and the noise, so a
        # skipped step's retry draws new ones instead of repeating what failed
        self.draws = 0
        self.bad_in_row = 0
        self.skipped_steps = 0
        self.history: Dict[str, list] = {"loss": []}
        self.fixed_loss: Dict[str, float] = {}  # the stage's loss on fixed batches: "start" and "end"
        self.sample_metrics: Dict[str, float] = {}  # what the last sample grid scored (digits: accuracy, DigitEval)
        self._t_teacher = self._c_teacher = 0.0
        self.last_load: Dict[str, Dict[str, float]] = {}
        self._signal = None
        self._grid = None  # latent presets: (prompts, VAE) once loaded; False when there is no VAE
        self._resume()
        if self.step == 0 and "start" not in self.fixed_loss:
            self.fixed_loss["start"] = self.fixed_batch_loss()
        self.tracker = Tracker(self.stage_dir, cfg.log.project, f"stage{cfg.stage}", to_dict(cfg),
                               cfg.log.wandb, self.info.is_main, start_step=self.step)
        log.info("stage %d: %s trainable parameters (%s), world %d, ep_size %d, start step %d",
                 cfg.stage, f"{n_train:,}", "+".join(self.trainable), self.info.world, cfg.parallel.ep_size, self.step)

    # -- setup pieces ----------------------------------------------------------------

    def _resume(self) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            return
        counters = load_checkpoint(reader, engine=self.engine, ema=self.ema, batches=self.batches,
                                   layout=self._layout(), rank=self.info.rank, seed=self.cfg.seed)
        self.step = int(counters["step"])
        self.draws = int(counters["draws"])
        self.skipped_steps = int(counters["skipped_steps"])
        self.history = counters["history"]
        self.fixed_loss = counters["fixed_loss"]
        self.last_load = counters["last_load"]
        log.info("resumed from %s at step %d", reader.folder, self.step)

    def _layout(self) -> Dict:
        return {"world_size": self.info.world, "ep_size": self.cfg.parallel.ep_size,
                "zero_stage": self.recipe.zero_stage}

    def _save(self) -> None:
        counters = {"step": self.step, "draws": self.draws, "skipped_steps": self.skipped_steps,
                    "history": self.history, "fixed_loss": self.fixed_loss, "last_load": self.last_load,
                    "wandb_run_id": self.tracker.run_id if hasattr(self, "tracker") else None,
                    "export": {"stage": self.cfg.stage, "init": str(Path(self.cfg.init).resolve()),
                               "student_meta": json.loads(self.student_meta("last").to_json()),
                               "tensors": self.export_plan}}
        save_checkpoint(self.ckpt, step=self.step, engine=self.engine, ema=self.ema, batches=self.batches,
                        counters=counters, layout=self._layout(), rank=self.info.rank)

    def student_meta(self, weights: str) -> StudentMeta:
        """The portable format's metadata of this stage's student (``weights``: what the weights are)."""
        meta = self.meta
        mob = to_dict(self.cfg.mob) if self.mob_added else meta.mob
        return StudentMeta(meta.base_model, meta.moe, meta.site_specs, mob, meta.dtype,
                           {**meta.extra, "stage": self.cfg.stage, "step": self.step, "weights": weights})

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        log.warning("received signal %d: checkpointing at the end of this step", signum)

    # -- one step --------------------------------------------------------------------

    def _losses(self, inputs, target) -> Dict[str, torch.Tensor]:
        """Every loss term of the stage's recipe on one micro-batch; ``total`` is their weighted sum.

        Collective: the block-feature weights and the routing losses use the global
        batch's statistics (one all_reduce each), so N ranks train what one would.
        """
        w = self.recipe.losses
        t0, c0 = time.perf_counter(), COMM_CLOCK.seconds()
        t_out, t_feats = self.teacher.velocity_and_features(inputs)
        self._t_teacher += time.perf_counter() - t0
        self._c_teacher += COMM_CLOCK.seconds() - c0
        clear_routing_stats(self.student)
        with tapped(self.student, detach=False) as s_feats:
            s_out = call_flux(self.engine, inputs)
        out: Dict[str, torch.Tensor] = {}
        out["output"] = L.output_loss(s_out, t_out)
        total = w.output * out["output"]
        if w.feature:
            out["feature"] = L.block_feature_loss(s_feats, t_feats, out["output"])  # global stats over WORLD
            total = total + w.feature * out["feature"]
        if w.group:
            keys = [k for k, _ in _group_keys(self.student)]
            out["group"] = L.group_feature_loss(s_feats, t_feats, keys)
            total = total + w.group * out["group"]
        if self.aux_losses:
            balance, z = L.router_aux_losses([m for _, m in moe_layers(self.student)])
            if w.balance:
                out["balance"] = balance
                total = total + w.balance * balance
            if any(m.z_loss_coeff for _, m in moe_layers(self.student)):
                out["z"] = z
                total = total + z
        with torch.no_grad():
            out["teacher_flow"] = torch.mean((t_out.float() - target.to(t_out.device).float()) ** 2)
        out["total"] = total
        return out

    @torch.no_grad()
    def fixed_batch_loss(self) -> Optional[float]:
        """The recipe's total loss, averaged over ``log.fixed_batches`` fixed batches and the ranks. Collective."""
        n = self.cfg.log.fixed_batches
        if n < 1:
            return None
        total = 0.0
        for i in range(n):
            inputs, target = self.batches.fixed(i)
            total += _mean_over_ranks({"total": self._losses(inputs.to(self.device), target)["total"]})["total"]
        return total / n

    def train_step(self, measure_comm: bool = False) -> Optional[Dict[str, float]]:
        """One optimizer step (grad_accum micro-steps); None when it was skipped (non-finite gradients).

        ``measure_comm``: split communication out of the step's times (synchronises around
        every collective, so only the steps that log ask for it).
        """
        if measure_comm:
            COMM_CLOCK.start()
        try:
            return self._train_step()
        finally:
            if measure_comm:
                COMM_CLOCK.stop()

    def _train_step(self) -> Optional[Dict[str, float]]:
        accum = self.cfg.optim.grad_accum
        values: Dict[str, float] = {}
        t_data = t_fwd_bwd = t_step = c_fwd_bwd = c_step = 0.0
        self._t_teacher = self._c_teacher = 0.0
        draw, self.draws = self.draws, self.draws + 1
        # Every micro-step runs its backward even after a non-finite loss: the skip is decided
        # at the accumulation boundary by DeepSpeed's own check of the reduced gradients (an
        # invalid norm discards the step whole: no update, no scheduler step, accumulation
        # buffers cleared), so the boundary never shifts and nothing stale leaks onward.
        for micro in range(accum):
            t0 = time.perf_counter()
            inputs, target = self._next_batch(draw, micro)
            inputs = inputs.to(self.device)  # fp32: autocast (bf16 mode) casts inside the matrix products
            t1, c1 = time.perf_counter(), COMM_CLOCK.seconds()
            out = self._losses(inputs, target)
            self.engine.backward(out["total"])
            t2, c2 = time.perf_counter(), COMM_CLOCK.seconds()
            self.engine.step()  # gradient reduction (ZeRO) and, at the boundary, the optimizer
            t_step += time.perf_counter() - t2
            c_step += COMM_CLOCK.seconds() - c2
            t_fwd_bwd += t2 - t1
            c_fwd_bwd += c2 - c1
            t_data += t1 - t0
            for k, v in _mean_over_ranks(out).items():
                values[k] = values.get(k, 0.0) + v / accum
        if not self.engine.was_step_applied():
            return None
        if self.ema is not None:
            self.ema.update()
        values["time/data"] = t_data
        # each phase without its collectives, all collectives together as communication (the clock
        # reads 0 on steps that do not measure; those steps are not logged)
        values["time/teacher_forward"] = self._t_teacher - self._c_teacher
        values["time/student_forward_backward"] = t_fwd_bwd - self._t_teacher - (c_fwd_bwd - self._c_teacher)
        values["time/optimizer"] = t_step - c_step
        values["time/communication"] = c_fwd_bwd + c_step
        values["time/communication_moe"] = COMM_CLOCK.ours_seconds()  # of which the MoE token exchange
        values["tokens_per_sample"] = float(inputs.hidden_states.shape[1] + inputs.encoder_hidden_states.shape[1])
        return values

    def _next_batch(self, draw: int, micro: int):
        """This rank's batch, once every rank has one. Collective.

        A data error on one rank (the stream ran dry, every shard unreadable) would leave the
        others blocked in the step's first collective until a transport timeout; the ranks agree
        first, and every rank stops with the same line.
        """
        try:
            batch, failure = self.batches.get(draw, micro), None
        except DataError as exc:
            batch, failure = None, str(exc)
        if any_true(failure is not None, self.device):
            raise ConfigError(_first_failure(failure, self.info.rank), everywhere=True)
        return batch

    def data_counts(self) -> Dict[str, int]:
        """Samples read and skipped as bad input (``skipped/<reason>``), summed over ranks. Collective."""
        local = getattr(self.batches, "data_counts", dict)()
        per_rank = [local]
        if dist.is_initialized() and dist.get_world_size() > 1:
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, local)
        total: Dict[str, int] = {}
        for counts in per_rank:
            for k, v in counts.items():
                total[k] = total.get(k, 0) + int(v)
        return dict(sorted(total.items()))

    def _check_skip_share(self, counts: Dict[str, int]) -> None:
        """Stop the run (the same line on every rank) when too many samples were bad input."""
        skipped, read = counts.get("skipped", 0), counts.get("samples", 0) + counts.get("skipped", 0)
        limit = self.cfg.data.max_skipped_fraction
        if read >= max(1, self.cfg.data.skip_check_after) and skipped > limit * read:
            reasons = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in counts.items() if k.startswith("skipped/"))
            raise ConfigError(f"data: {skipped} of {read} samples read so far were skipped as bad input ({reasons}), "
                              f"more than data.max_skipped_fraction={limit}: fix the shards (d2m precompute "
                              f"reports each reason) or raise the limit", everywhere=True)

    def _autocast(self):
        """bf16 autocast for sampling (in training the student's comes from its engine, DeepSpeed
        ``torch_autocast``, and the teacher's from :class:`FrozenTeacher`)."""
        return bf16_autocast(self.device.type, dss.use_bf16(self.cfg, self.info))

    # -- the loop --------------------------------------------------------------------

    def train(self) -> int:
        cfg = self.cfg
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        bar = None
        if self.info.is_main and cfg.log.progress:
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"stage {cfg.stage}", dynamic_ncols=True)
        samples_per_step = cfg.data.batch_size * self.info.world * cfg.optim.grad_accum
        # throughput over the unmeasured steps since the last log, beside the logged step's own
        # (which synchronises around every collective to split out communication); the window
        # opens at a step's start, so checkpoints and sample grids after a log stay outside it
        self._window = None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                logs = self.step + 1 == cfg.steps or (self.step + 1) % max(1, cfg.log.every) == 0
                if self._window is None:
                    self._window = (t0, self.step)
                values = self.train_step(measure_comm=logs)
                if values is None:
                    self.skipped_steps += 1
                    self.bad_in_row += 1
                    log.warning("non-finite gradients at step %d: step skipped (%d in a row)", self.step,
                                self.bad_in_row)
                    if self.bad_in_row >= cfg.max_bad_steps:
                        self.ckpt.root = self.stage_dir / "diagnostic"
                        self._save()
                        log.error("%d non-finite steps in a row: diagnostic checkpoint in %s", self.bad_in_row,
                                  self.ckpt.root)
                        return EXIT_DIVERGED
                    continue
                self.bad_in_row = 0
                self.step += 1
                self.history["loss"].append(values["total"])
                for k, v in values.items():
                    if not k.startswith("time/") and k not in ("total", "tokens_per_sample"):
                        self.history.setdefault(k, []).append(v)
                dt = time.perf_counter() - t0
                self._step_start = t0
                if self.step % max(1, cfg.log.every) == 0 or self.step == cfg.steps:
                    self._log(values, dt, samples_per_step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.4f}", img_s=f"{samples_per_step / dt:.0f}")
                if cfg.log.sample_every and self.step % cfg.log.sample_every == 0:
                    self.sample_grid()
                stop = any_true(self._signal is not None, self.device)
                periodic = cfg.ckpt.every and self.step % cfg.ckpt.every == 0
                if stop or periodic or self.step == cfg.steps:
                    self._save()
                if stop:
                    log.warning("stopped by signal at step %d; run the same command to resume", self.step)
                    return EXIT_PREEMPTED
            return EXIT_OK
        finally:
            if bar is not None:
                bar.close()
            for s, h in old.items():
                signal.signal(s, h)
            self.tracker.finish()

    def sample_grid(self) -> Optional[Path]:
        """Teacher vs student samples from the same noise: a PNG under the stage folder and in wandb.

        Collective: every rank samples (expert-parallel layers exchange tokens), rank 0 writes.
        A teacher of a registered kind (the digits preset) draws its own grid and scores it;
        presets on VAE latents sample the first prompts of the training shards and decode with
        the teacher pipeline's VAE.
        """
        kind = teacher_kind(self.cfg.teacher.path)
        if kind is None:
            return self._latent_grid()
        out = self.stage_dir / "samples" / f"step_{self.step:06d}.png"
        was_training = self.student.training
        metrics = kind.sample_grid(GridRequest(self.cfg.teacher.path, self.teacher.module, self.student,
                                               self.cfg.log.sample_count, self.cfg.log.sample_steps, out,
                                               self.info.is_main, self._autocast))
        self.student.train(was_training)
        self.sample_metrics = dict(metrics)
        if not self.info.is_main:
            return None
        self.tracker.log_image("samples", out, self.step)
        self.tracker.log(metrics, self.step)
        return out

    def _latent_grid(self) -> Optional[Path]:
        if self.cfg.data.source != "shards":
            return None
        if self._grid is None:
            vae_dir = fs.find_vae(self.cfg.teacher.path, self.cfg.log.sample_vae)
            if vae_dir is None:
                log.warning("no sample grid: the teacher %s has no vae/ beside it; set log.sample_vae",
                            self.cfg.teacher.path)
                self._grid = False
                return None
            self._grid = (fs.prompts_from_shards(self.cfg.data.urls, self.cfg.log.sample_count),
                          fs.load_vae(vae_dir, self.device))
            if self.info.is_main:
                prompts = self.stage_dir / "samples" / "prompts.txt"
                prompts.parent.mkdir(parents=True, exist_ok=True)
                prompts.write_text("".join(f"{c}\n" for c in self._grid[0].captions))
        if self._grid is False:
            return None
        prompts, vae = self._grid
        embedded = self.batches.guidance if self.teacher.config.guidance_embeds else None
        sampler = SamplerConfig(steps=self.cfg.log.sample_steps, shift=True, embedded_guidance=embedded, seed=0)
        with self._autocast():
            latents = fs.sample_models([self.teacher.module, self.student], prompts, sampler)
        if not self.info.is_main:
            return None
        rows = [fs.decode(vae, x, prompts.latent_shape) for x in latents]
        path = fs.save_rgb_grid(rows, self.stage_dir / "samples" / f"step_{self.step:06d}.png")
        self.tracker.log_image("samples", path, self.step)
        return path

    def _log(self, values: Dict[str, float], dt: float, samples_per_step: int) -> None:
        # collective: every rank logs at the same steps
        load, usage = expert_load(self.student, self.device), block_usage(self.student, self.device)
        self.last_load = load
        metrics = {f"loss/{k}": v for k, v in values.items() if not k.startswith("time/") and k != "tokens_per_sample"}
        metrics.update({k: v for k, v in values.items() if k.startswith("time/")})
        metrics.update(flatten_metrics(load, usage))
        metrics["images_per_s"] = samples_per_step / dt
        t_window, step_window = self._window or (self._step_start, self.step - 1)
        if self.step - 1 > step_window:  # the steps before this one since the window opened
            metrics["images_per_s_between_logs"] = (self.step - 1 - step_window) * samples_per_step / (
                self._step_start - t_window)
        metrics["tokens_per_s"] = samples_per_step * values.pop("tokens_per_sample", 0.0) / dt
        metrics["lr"] = self.engine.get_lr()[0]
        metrics["skipped_steps"] = self.skipped_steps
        self.last_data_counts = self.data_counts()
        metrics.update({f"data/{k}": v for k, v in self.last_data_counts.items()})
        if torch.cuda.is_available():
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_metrics = metrics
        self.tracker.log(metrics, self.step)
        self._check_skip_share(self.last_data_counts)  # after logging: the counts that stop the run are on record
        self._window = None  # reopened at the next step's start: saves and sample grids stay outside
        if self.info.is_main:
            log.info("step %d/%d loss %.6f %s", self.step, self.cfg.steps, values["total"],
                     " ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in ("total", "tokens_per_sample") and not k.startswith("time/")))

    # -- results ---------------------------------------------------------------------

    def summary(self) -> Dict:
        load = getattr(self, "last_load", {})
        return {
            "stage": self.cfg.stage, "step": self.step, "skipped_steps": self.skipped_steps,
            "fixed_batch_loss": self.fixed_loss,
            "samples": self.sample_metrics,  # the end-of-stage sample grid's scores: what the stage cost in quality
            "first_loss": self.history["loss"][0] if self.history["loss"] else None,
            "last_loss": self.history["loss"][-1] if self.history["loss"] else None,
            "max_over_mean_expert_load": {k: v["max_over_mean"] for k, v in load.items()},
            "data": getattr(self, "last_data_counts", {}),
            "state_bytes_rank0": dss.state_bytes(self.engine),  # expert weights and optimizer state
            "wandb_run_id": self.tracker.run_id,
            "history": self.history,
        }


def _first_failure(failure: Optional[str], rank: int) -> str:
    """The failure message of the lowest failing rank, on every rank. Collective."""
    failures = [failure]
    if dist.is_initialized() and dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
    first = next(r for r, f in enumerate(failures) if f is not None)
    return f"rank {first}: {failures[first]}" if len(failures) > 1 else str(failures[first])


def _mean_over_ranks(out: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Loss values averaged over data-parallel ranks: the global batch's losses."""
    keys = sorted(out)
    t = torch.stack([out[k].detach().float().reshape(()) for k in keys]).double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


def export_student(trainer: "StageTrainer") -> Optional[Path]:
    """Write the trained student in the portable format to ``<stage_dir>/export`` (the next stage's init).

    Weights are stored in the student folder's dtype (training ran on fp32 master weights).
    """
    sd = dss.gather_full_state_dict(trainer.student, trainer.ep_group)
    ema = trainer.ema is not None and trainer.cfg.ema.export
    if ema:
        sd.update(trainer.ema.full_state_dict())  # collective
    if not trainer.info.is_main:
        return None
    out_meta = trainer.student_meta(f"ema {trainer.cfg.ema.decay}" if ema else "last")
    sd = to_storage_dtype(sd, parse_dtype(trainer.meta.dtype))
    try:
        provenance = read_provenance(trainer.cfg.init)
    except ConfigError:
        provenance = None
    out = write_student(trainer.stage_dir / "export", sd, out_meta, provenance, overwrite=True)
    if trainer.cfg.export_diffusers:
        write_diffusers_student(out, diffusers_folder(out), overwrite=True)
    return out


def _group_keys(model):
    return [(k, m) for k, m in tap_points(model) if isinstance(m, MoBGroup)]


def run_stage(cfg: StageConfig) -> int:
    trainer = StageTrainer(cfg)
    try:
        code = trainer.train()
        if code == EXIT_OK:
            trainer.fixed_loss["end"] = trainer.fixed_batch_loss()
            trainer.sample_grid()
            export_student(trainer)
        if trainer.info.is_main:
            # torchrun reports any failing worker as exit 1; launchers read the real outcome here
            status = os.environ.get("D2M_STATUS_FILE")
            if status:
                Path(status).write_text(f"{code}\n")
            trainer.stage_dir.mkdir(parents=True, exist_ok=True)
            (trainer.stage_dir / "summary.json").write_text(json.dumps(trainer.summary(), indent=2, default=str))
        return code
    finally:
        if trainer.run_lock is not None:  # after the last write to the run folder (atexit covers errors in __init__)
            trainer.run_lock.release()

