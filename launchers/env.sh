# Environment shared by launchers, tests and Slurm scripts (sourced, not run).
# Offline by default: no hub downloads, wandb writes locally unless the user chose otherwise.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# DeepSpeed JIT-compiles a shared-memory op on first use (~50 s): keep it across runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(pwd)/.cache/torch_extensions}
# Caption encodings of the offline text encoder, reused across processes (d2m_dist/digits/text_encoder.py).
export D2M_TEXT_CACHE=${D2M_TEXT_CACHE:-$(pwd)/.cache/text_encodings}
