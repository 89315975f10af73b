"""``d2m <verb>``: the command line. Thin: parse, load the config, call the library.

Every user error (bad config, missing file, invalid spec...) ends as one line
``d2m: error: ...`` on stderr and exit status 2, before work starts.

Each verb imports its library module when it runs, not when this module loads:
``d2m --help`` and argument errors stay instant instead of paying for torch,
DeepSpeed and diffusers (several seconds). Those imports carry ``# lazy:``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from d2m_dist.config import (
    ConfigError,
    ConvertConfig,
    StageConfig,
    TeacherConfig,
    load_config,
)
from d2m_dist.data.errors import DataError


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank} %(name)s] %(message)s", datefmt="%H:%M:%S")
    # megatron-core announces its optional backends at INFO on import
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _join_process_group_if_launched(device: str):
    """Join the process group when started by torchrun with several processes (WORLD_SIZE > 1); its DistInfo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from d2m_dist.parallel.dist import init_distributed  # lazy: DeepSpeed's import

        return init_distributed(device)
    return None


def cmd_convert(args) -> int:
    from d2m_dist.convert.pipeline import run_convert  # lazy: torch, diffusers

    cfg = load_config(ConvertConfig, args.config, args.overrides)
    _join_process_group_if_launched(str(cfg.device))
    out = run_convert(cfg)
    if out is not None:
        print(f"student written to {out}")
    return 0


def cmd_train(args) -> int:
    from d2m_dist.distill.trainer import run_stage  # lazy: torch, DeepSpeed, diffusers

    cfg = load_config(StageConfig, args.config, args.overrides)
    return run_stage(cfg)


def cmd_teacher(args) -> int:
    """Pretrain the digits preset's dense teacher and save it in diffusers format."""
    from d2m_dist.digits.card import PretrainConfig  # lazy: the preset's imports
    from d2m_dist.digits.teacher import pretrain_teacher  # lazy: torch, diffusers

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ConfigError(f"teacher output {args.out} already exists and is not empty")
    cfg.validate()
    _, quality = pretrain_teacher(cfg, args.out, eval_per_class=args.eval_per_class, eval_scales=(1.0, 2.0))
    what = "DigitEval" if cfg.task == "digiteval" else "digit accuracy"
    print(f"teacher written to {args.out}; {what} {json.dumps(quality)}")
    return 0


def cmd_sample(args) -> int:
    """Teacher vs student on the digits preset: sample grid PNG and digit accuracy JSON."""
    from d2m_dist.digits.card import teacher_card  # lazy: the preset's imports
    from d2m_dist.digits.evaluate import (  # lazy: torch
        EvalConfig,
        compare_with_teacher,
        save_grid,
    )
    from d2m_dist.models.flux import load_teacher  # lazy: diffusers
    from d2m_dist.models.portable import load_student  # lazy: torch

    cfg = load_config(EvalConfig, None, args.overrides)
    teacher = load_teacher(TeacherConfig(path=args.teacher))
    student = load_student(args.student)
    accuracy, images = compare_with_teacher(teacher, student, teacher_card(args.teacher), cfg, top_k=args.k)
    grid = save_grid(images, cfg.n_per_digit, args.out)
    result = {"accuracy": accuracy, "grid": str(grid), "rows": list(accuracy), **vars(cfg)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


def cmd_generate(args) -> int:
    """Images from a student (and its teacher beside it) for prompts: PNGs, grid.png, generate.json."""
    from d2m_dist.eval.generate import (  # lazy: torch, diffusers
        GenerateRequest,
        check_request,
        read_prompts,
        run_generate,
    )
    from d2m_dist.parallel.dist import pick_device  # lazy: torch

    req = GenerateRequest(student=args.student, pipeline=args.pipeline, prompts=read_prompts(args.prompt, args.prompts),
                          out=args.out, seed=args.seed, steps=args.steps, guidance=args.guidance, height=args.height,
                          width=args.width, top_k=args.top_k, mob_kappa=args.mob_kappa, teacher_too=args.teacher_too,
                          dtype=args.dtype, overwrite=args.overwrite)
    checked = check_request(req)  # before the process group: bad input is one line, nothing started
    joined = _join_process_group_if_launched(args.device)
    device = joined.device if joined is not None else pick_device(args.device)
    result = run_generate(req, device, checked)
    if result is not None:
        print(f"{len(result['images'])} prompts written to {args.out} (grid.png, generate.json)")
    return 0


def cmd_eval(args) -> int:
    """DigitEval scores of a teacher or student, fidelity to the teacher, grids and a table row."""
    from d2m_dist.digits.digiteval_report import (  # lazy: torch, diffusers, scikit-learn
        EvalRequest,
        check_request,
        parse_seeds,
        run_eval,
    )

    req = EvalRequest(model=args.model, out=args.out, teacher=args.teacher, prompts_file=args.prompts,
                      per_category=args.per_category, prompt_seed=args.prompt_seed, seeds=parse_seeds(args.seeds),
                      steps=args.steps, top_k=args.top_k, mob_kappa=args.mob_kappa,
                      velocity_batches=args.velocity_batches, label=args.label, overwrite=args.overwrite)
    checked = check_request(req)  # bad input: one line, nothing loaded or written
    result = run_eval(req, checked)
    print(result["row"])
    print(f"written to {args.out} (eval.json, row.md, grid_<category>.png)")
    return 0


def cmd_plan(args) -> int:
    """Which layout of a stage fits a cluster, and how fast it goes (meta device: nothing loaded)."""
    from d2m_dist.plan.report import PlanRequest, format_plan, run_plan  # lazy: torch, diffusers
    from d2m_dist.plan.traffic import Rates  # lazy: with the planner above

    rates = Rates(tflops=args.tflops, intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps,
                  pcie_gbps=args.pcie_gbps)
    result = run_plan(PlanRequest(
        config=args.config, stage=args.stage, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_mem=args.gpu_mem, host_mem=args.host_mem, ep=args.ep, zero=args.zero, teacher=args.teacher,
        batch=args.batch, resolution=args.resolution, text_tokens=args.text_tokens,
        act_ckpt=True if args.act_ckpt else None, rates=rates, overrides=args.overrides))
    print(json.dumps(result, indent=2) if args.json else "\n".join(format_plan(result)))
    return 0 if result["best"] is not None else 1


def cmd_params(args) -> int:
    """Parameter accounting of the student a stage-0 config would produce (meta device, no weights);
    ``--paper``: FLUX.1-dev and the MoE-L/S/XS presets beside the paper's parameters and TFLOPs."""
    if args.paper:
        if args.config or args.overrides:
            raise ConfigError("params --paper reads the FLUX.1-dev presets itself: give it no config or overrides")
        from d2m_dist.models.paper import conventions, format_table, paper_table  # lazy: torch, diffusers

        rows = paper_table()
        if args.json:
            print(json.dumps({"conventions": conventions(), "rows": [r.as_dict() for r in rows]}, indent=2))
        else:
            print("\n".join(format_table(rows)))
        return 0
    from d2m_dist.models.accounting import parameter_report  # lazy: diffusers

    overrides = list(args.overrides)
    if not any(o.startswith("output=") for o in overrides):
        overrides.append("output=dry-run")
    cfg = load_config(ConvertConfig, args.config, overrides)
    dense_total, dense_ffn, rep = parameter_report(cfg.teacher, cfg.moe, cfg.mob)
    if args.json:
        print(json.dumps({"dense_total": dense_total, "dense_ffn": dense_ffn, **rep.as_dict()}, indent=2))
    else:
        print(f"dense teacher               {dense_total / 1e9:.3f}B (FFN {dense_ffn / 1e9:.3f}B)")
        for line in rep.lines():
            print(line)
        print(f"activated FFN share         {rep.ffn_activated / dense_ffn:.2%} of dense FFN")
    return 0


def cmd_shards_make(args) -> int:
    from d2m_dist.data.shards import (  # lazy: webdataset, PIL
        ShardWriterConfig,
        make_shards,
    )

    cfg = load_config(ShardWriterConfig, args.config, args.overrides)
    manifest = make_shards(args.source, cfg)
    print(f"{manifest.total_samples} samples in {len(manifest.shards)} shards: {manifest.url}")
    return 0


def cmd_precompute(args) -> int:
    from d2m_dist.data.precompute import (  # lazy: torch, diffusers
        PrecomputeConfig,
        precompute,
    )

    cfg = load_config(PrecomputeConfig, args.config, args.overrides)
    _join_process_group_if_launched(cfg.device)
    result = precompute(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.manifest
        print(f"{m.total_samples} samples in {len(m.shards)} precomputed shards ({len(result.written)} encoded now, "
              f"{result.reused} already done): {m.url}")
    return 0


def cmd_ckpt_inspect(args) -> int:
    from d2m_dist.ckpt.export import inspect  # lazy: torch, safetensors

    print(json.dumps(inspect(args.path), indent=2))
    return 0


def cmd_ckpt_export(args) -> int:
    from d2m_dist.ckpt.export import export, export_diffusers  # lazy: torch, safetensors

    shard_bytes = int(args.max_shard_gb * 2**30)
    if args.format == "diffusers":
        if args.optimizer:
            raise ConfigError("--optimizer goes with --format portable (the training interchange) only")
        out = export_diffusers(args.path, args.out, weights=args.weights, init=args.init, max_shard_bytes=shard_bytes,
                               overwrite=args.overwrite)
    else:
        out = export(args.path, args.out, weights=args.weights, optimizer=args.optimizer, init=args.init,
                     max_shard_bytes=shard_bytes, overwrite=args.overwrite)
    print(f"student written to {out}")
    return 0


def cmd_bench(args) -> int:
    from d2m_dist.bench.runner import run_benchmark  # lazy: every benchmark's imports

    return run_benchmark(args.name, args.overrides, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2m", description="Dense2MoE distillation for FLUX")
    sub = p.add_subparsers(dest="verb", required=True)

    def with_config(name: str, help: str, func):
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key=value overrides (omegaconf dotlist)")
        sp.set_defaults(func=func)
        return sp

    with_config("convert", "stage 0: dense teacher -> MoE student folder", cmd_convert)
    with_config("train", "stages 1-3: distil the student from the frozen teacher (DeepSpeed)", cmd_train)
    sp = with_config("teacher", "pretrain the digits preset's dense FLUX-architecture teacher", cmd_teacher)
    sp.add_argument("--out", required=True, help="output folder (diffusers pipeline root)")
    sp.add_argument("--eval-per-class", "--eval-per-digit", type=int, default=20,
                    help="samples per digit (task digits) or prompts per category (task digiteval) scored")
    sp = sub.add_parser("sample", help="digits: teacher vs student sample grid and accuracy")
    sp.add_argument("--teacher", required=True)
    sp.add_argument("--student", required=True)
    sp.add_argument("--k", type=int, help="active routed experts at every site (default: each site's spec k)")
    sp.add_argument("--out", required=True, help="grid PNG path")
    sp.add_argument("--json", help="write the accuracies here")
    sp.add_argument("overrides", nargs="*", help="n_per_digit=, steps=, guidance_scale=, seed=")
    sp.set_defaults(func=cmd_sample)
    sp = sub.add_parser("generate", help="images from a student (FluxPipeline or a preset's teacher) for prompts")
    sp.add_argument("--student", required=True, help="a student folder: portable (d2m_config.json) or diffusers")
    sp.add_argument("--pipeline", required=True, help="the teacher's pipeline folder (FLUX: vae, text encoders...)")
    sp.add_argument("--prompt", help="one prompt")
    sp.add_argument("--prompts", help="a file: one prompt per line, or JSON lines with a \"prompt\" field")
    sp.add_argument("--seed", type=int, default=0, help="image i (in prompt order) uses seed + i")
    sp.add_argument("--steps", type=int, help="denoising steps (FLUX default 28; digits 20)")
    sp.add_argument("--guidance", type=float, help="FLUX: embedded guidance (default 3.5); digits: CFG scale (1)")
    sp.add_argument("--height", type=int)
    sp.add_argument("--width", type=int)
    sp.add_argument("--top-k", type=int, help="active routed experts at every site (default: each site's spec k)")
    sp.add_argument("--mob-kappa", type=int, help="active blocks per Mixture-of-Blocks group (default: the group's)")
    sp.add_argument("--teacher-too", action="store_true", help="the teacher's image beside each, same noise")
    sp.add_argument("--out", required=True, help="output folder (written whole, or not at all)")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda")
    sp.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on a GPU, fp32 on the CPU")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_generate)
    sp = sub.add_parser("eval", help="DigitEval: per-category scores over seeds, fidelity to the teacher, grids")
    sp.add_argument("--model", required=True, help="a DigitEval teacher folder, or a student (portable or diffusers)")
    sp.add_argument("--teacher", help="the teacher (required for a student): same noise, fidelity, its card")
    sp.add_argument("--prompts", help="JSON lines of DigitEval prompts (default: --per-category drawn prompts)")
    sp.add_argument("--per-category", type=int, default=50)
    sp.add_argument("--prompt-seed", type=int, default=0)
    sp.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="noise seeds (scores' spread over them)")
    sp.add_argument("--steps", type=int, default=20, help="Euler steps")
    sp.add_argument("--top-k", type=int, help="active routed experts at every site (default: the student's own)")
    sp.add_argument("--mob-kappa", type=int, help="active blocks per Mixture-of-Blocks group (default: the student's)")
    sp.add_argument("--velocity-batches", type=int, default=4, help="held-out batches of 32 for velocity MSE (0: none)")
    sp.add_argument("--label", help="the markdown row's name (default: the model folder's name)")
    sp.add_argument("--out", required=True, help="output folder (written whole, or not at all)")
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_eval)
    sp = sub.add_parser("plan", help="what fits on a cluster: bytes per GPU, traffic, ranked layouts (docs/CLUSTERS.md)")
    sp.add_argument("--config", required=True, help="a preset folder (configs/presets/flux-dev-moe-l) or a stage file")
    sp.add_argument("--stage", type=int, default=2, help="the stage to plan (a preset folder's stage<N>.yaml)")
    sp.add_argument("--nodes", type=int, required=True)
    sp.add_argument("--gpus-per-node", type=int, required=True)
    sp.add_argument("--gpu-mem", required=True, help="memory per GPU, e.g. 80GB")
    sp.add_argument("--host-mem", default="1TB", help="host memory per node (offloaded teacher)")
    sp.add_argument("--ep", type=int, help="expert-parallel size (default: every divisor, ranked)")
    sp.add_argument("--zero", type=int, choices=(2, 3), help="the student's ZeRO stage (default: both)")
    sp.add_argument("--teacher", choices=("resident", "sharded", "offload"), help="default: all three")
    sp.add_argument("--batch", type=int, help="per-GPU batch (default: the stage's data.batch_size)")
    sp.add_argument("--resolution", type=int, default=1024, help="image side in pixels")
    sp.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (FLUX.1-dev: 512)")
    sp.add_argument("--act-ckpt", action="store_true",
                    help="plan with activation checkpointing (the trainer does not checkpoint yet; default: without)")
    sp.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU (default 400)")
    sp.add_argument("--intra-gbps", type=float, default=300.0, help="GB/s per GPU inside a node (default 300)")
    sp.add_argument("--inter-gbps", type=float, default=40.0, help="GB/s per GPU between nodes (default 40)")
    sp.add_argument("--pcie-gbps", type=float, default=25.0, help="GB/s host to GPU (default 25)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the stage config")
    sp.set_defaults(func=cmd_plan)
    sp = with_config("params", "parameter accounting of a conversion config (meta device)", cmd_params)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--paper", action="store_true",
                    help="FLUX.1-dev and the MoE-L/S/XS presets: parameters and TFLOPs beside the paper's")

    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="shards_verb", required=True)
    sp = shards.add_parser("make", help="write shards from a folder, a CSV/JSONL/parquet table, or 'digits'")
    sp.add_argument("source", help="image folder, table file, or 'digits'")
    sp.add_argument("--config", help="YAML ShardWriterConfig")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out_dir=data/digits max_samples=256")
    sp.set_defaults(func=cmd_shards_make)

    with_config("precompute", "encode raw shards once: VAE latents + text embeddings (torchrun: N ranks)",
                cmd_precompute)

    ckpt = sub.add_parser("ckpt", help="training checkpoints").add_subparsers(dest="ckpt_verb", required=True)
    sp = ckpt.add_parser("inspect", help="layout, step, what it holds, sizes (JSON)")
    sp.add_argument("path", help="a checkpoint folder, a checkpoints folder (its latest) or a stage folder")
    sp.set_defaults(func=cmd_ckpt_inspect)
    sp = ckpt.add_parser("export", help="a checkpoint as a student folder (portable or diffusers), one tensor at a time")
    sp.add_argument("path", help="a checkpoint folder, a checkpoints folder (its latest) or a stage folder; "
                                 "with --format diffusers also a portable student folder")
    sp.add_argument("--format", default="portable", choices=("portable", "diffusers"),
                    help="portable: the training interchange; diffusers: FluxMoETransformer2DModel for FluxPipeline")
    sp.add_argument("--out", required=True, help="the student folder to write")
    sp.add_argument("--weights", default="last", choices=("last", "ema"), help="the last weights or their EMA")
    sp.add_argument("--optimizer", action="store_true",
                    help="also the Adam moments and counters (a stage can start from them: ckpt.init_state=true)")
    sp.add_argument("--init", help="the stage's init folder (frozen weights), if it moved since training")
    sp.add_argument("--max-shard-gb", type=float, default=5.0)
    sp.add_argument("--overwrite", action="store_true")
    sp.set_defaults(func=cmd_ckpt_export)

    sp = sub.add_parser("bench", help="benchmarks (docs/BENCHMARKS.md)")
    sp.add_argument("name", help="mob | partition | data | step")
    sp.add_argument("overrides", nargs="*", help="key=value settings of the benchmark")
    sp.add_argument("--out", help="also append the markdown table to this file")
    sp.set_defaults(func=cmd_bench)
    return p


EXIT_BAD_INPUT = 2


def report_user_error(exc: ConfigError) -> int:
    """Print ``d2m: error: ...`` once per job, record status 2 for the launcher; the process's exit code.

    Under torchrun every rank runs this. An error that every rank reached alike (raised before the
    process group existed, or agreed through a collective) is printed by rank 0 alone; another is
    printed by its rank, tagged. torchrun turns a worker's non-zero exit into its own 1 and a
    ChildFailedError traceback, so under our launchers (they read the status file) an error of every
    rank exits 0 and the launcher exits 2; an error of one rank alone exits 2, so that torchrun stops
    the other ranks at once instead of leaving them blocked in a collective.
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    dist_mod = sys.modules.get("torch.distributed")
    uniform = exc.everywhere or not (dist_mod is not None and dist_mod.is_available() and dist_mod.is_initialized())
    reporter = rank == 0 or not uniform
    if reporter:
        print(f"d2m: error: {'' if uniform else f'[rank {rank}] '}{exc}", file=sys.stderr)
    status = os.environ.get("D2M_STATUS_FILE")
    if status and reporter:
        Path(status).write_text(f"{EXIT_BAD_INPUT}\n")
    if uniform and status and os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0
    return EXIT_BAD_INPUT


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        # lazy: the embedded digits preset registers its data source, encoder, batches and teacher kind
        import d2m_dist.digits  # noqa: F401

        try:
            return args.func(args)
        except DataError as exc:
            raise ConfigError(str(exc), everywhere=getattr(exc, "everywhere", False)) from None
    except ConfigError as exc:
        return report_user_error(exc)
    except KeyboardInterrupt:
        print("d2m: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
