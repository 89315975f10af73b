"""``d2m <verb>``: the command line. Thin: parse, load the config, call the library.

Every user error (bad config, missing file, invalid spec...) ends as one line
``d2m: error: ...`` on stderr and exit status 2, before work starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

from d2m_dist.config import ConfigError, ConvertConfig, load_config
from d2m_dist.data.errors import DataError


def _setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    level = logging.INFO if rank == "0" else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank} %(name)s] %(message)s", datefmt="%H:%M:%S")
    # megatron-core announces its optional backends at INFO on import
    logging.getLogger("megatron").setLevel(logging.WARNING)


def _init_distributed_if_launched() -> None:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def cmd_convert(args) -> int:
    from d2m_dist.convert.pipeline import run_convert

    cfg = load_config(ConvertConfig, args.config, args.overrides)
    _init_distributed_if_launched()
    out = run_convert(cfg)
    if out is not None:
        print(f"student written to {out}")
    return 0


def cmd_train(args) -> int:
    from d2m_dist.config import StageConfig
    from d2m_dist.distill.trainer import run_stage

    cfg = load_config(StageConfig, args.config, args.overrides)
    return run_stage(cfg)


def cmd_teacher(args) -> int:
    """Pretrain the digits preset's dense teacher and save it in diffusers format."""
    from pathlib import Path

    from d2m_dist.distill.pretrain_teacher import PretrainConfig, pretrain_teacher

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    try:
        cfg.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise ConfigError(f"teacher output {args.out} already exists and is not empty")
    _, accuracy = pretrain_teacher(cfg, args.out, eval_per_digit=args.eval_per_digit, eval_scales=(1.0, 2.0))
    print(f"teacher written to {args.out}; digit accuracy {accuracy}")
    return 0


def cmd_sample(args) -> int:
    """Teacher vs student on the digits preset: sample grid PNG and digit accuracy JSON."""
    from pathlib import Path

    from d2m_dist.config import TeacherConfig
    from d2m_dist.convert.digits_calibration import teacher_card
    from d2m_dist.eval.digits_eval import EvalConfig, compare_with_teacher, save_grid
    from d2m_dist.models.flux import load_teacher
    from d2m_dist.models.portable import load_student

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


def cmd_params(args) -> int:
    """Parameter accounting of the student a stage-0 config would produce (meta device, no weights)."""
    from d2m_dist.models.accounting import count, dense_ffn_params, moe_param_report
    from d2m_dist.models.flux import load_teacher
    from d2m_dist.models.mob import apply_mob
    from d2m_dist.models.spec import select_sites
    from d2m_dist.models.surgery import convert_to_moe

    overrides = list(args.overrides)
    if not any(o.startswith("output=") for o in overrides):
        overrides.append("output=dry-run")
    cfg = load_config(ConvertConfig, args.config, overrides)
    teacher = load_teacher(cfg.teacher, meta=True)
    dense_total, dense_ffn = count(teacher), dense_ffn_params(teacher)
    c = teacher.config
    specs = select_sites(cfg.moe, c.num_layers, c.num_single_layers)
    student = apply_mob(convert_to_moe(teacher, specs, cfg.moe), cfg.mob)
    rep = moe_param_report(student)
    if args.json:
        print(json.dumps({"dense_total": dense_total, "dense_ffn": dense_ffn, **rep.as_dict()}, indent=2))
    else:
        print(f"dense teacher               {dense_total / 1e9:.3f}B (FFN {dense_ffn / 1e9:.3f}B)")
        for line in rep.lines():
            print(line)
        print(f"activated FFN share         {rep.ffn_activated / dense_ffn:.2%} of dense FFN")
    return 0


def cmd_shards_make(args) -> int:
    from d2m_dist.data.errors import DataError
    from d2m_dist.data.shards import ShardWriterConfig, make_shards

    cfg = load_config(ShardWriterConfig, args.config, args.overrides)
    try:
        manifest = make_shards(args.source, cfg)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    print(f"{manifest.total_samples} samples in {len(manifest.shards)} shards: {manifest.url}")
    return 0


def cmd_precompute(args) -> int:
    from d2m_dist.data.errors import DataError
    from d2m_dist.data.precompute import PrecomputeConfig, precompute

    try:
        cfg = load_config(PrecomputeConfig, args.config, args.overrides)
        _init_distributed_if_launched()
        result = precompute(cfg)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.manifest
        print(f"{m.total_samples} samples in {len(m.shards)} precomputed shards ({len(result.written)} encoded now, "
              f"{result.reused} already done): {m.url}")
    return 0


def cmd_bench(args) -> int:
    from d2m_dist.bench.runner import run_benchmark

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
    sp.add_argument("--eval-per-digit", type=int, default=20)
    sp = sub.add_parser("sample", help="digits: teacher vs student sample grid and accuracy")
    sp.add_argument("--teacher", required=True)
    sp.add_argument("--student", required=True)
    sp.add_argument("--k", type=int, help="active routed experts at every site (default: each site's spec k)")
    sp.add_argument("--out", required=True, help="grid PNG path")
    sp.add_argument("--json", help="write the accuracies here")
    sp.add_argument("overrides", nargs="*", help="n_per_digit=, steps=, guidance_scale=, seed=")
    sp.set_defaults(func=cmd_sample)
    sp = with_config("params", "parameter accounting of a conversion config (meta device)", cmd_params)
    sp.add_argument("--json", action="store_true")

    shards = sub.add_parser("shards", help="webdataset shards").add_subparsers(dest="shards_verb", required=True)
    sp = shards.add_parser("make", help="write shards from a folder, a CSV/JSONL/parquet table, or 'digits'")
    sp.add_argument("source", help="image folder, table file, or 'digits'")
    sp.add_argument("--config", help="YAML ShardWriterConfig")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out_dir=data/digits max_samples=256")
    sp.set_defaults(func=cmd_shards_make)

    with_config("precompute", "encode raw shards once: VAE latents + text embeddings (torchrun: N ranks)",
                cmd_precompute)

    sp = sub.add_parser("bench", help="benchmarks (docs/BENCHMARKS.md)")
    sp.add_argument("name", help="mob | partition")
    sp.add_argument("overrides", nargs="*", help="key=value settings of the benchmark")
    sp.add_argument("--out", help="also append the markdown table to this file")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return args.func(args)
    except (ConfigError, DataError) as exc:
        print(f"d2m: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("d2m: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
