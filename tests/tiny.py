"""Tiny FLUX models and inputs shared by the tests."""

from __future__ import annotations

import torch

from d2m_dist.models.flux import FluxInputs, build_flux, latent_image_ids

TINY_CONFIG = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 16,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
    "in_channels": 16,
    "joint_attention_dim": 24,
    "num_attention_heads": 2,
    "num_layers": 2,
    "num_single_layers": 2,
    "patch_size": 1,
    "pooled_projection_dim": 12,
}


def tiny_flux(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_flux({**TINY_CONFIG, **overrides})
    # diffusers zero-initialises nothing that matters here, but make every weight
    # non-trivial so that a dropped neuron or bias shows up in outputs
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def tiny_inputs(batch: int = 3, h: int = 4, w: int = 4, txt: int = 5, seed: int = 1, config=None) -> FluxInputs:
    cfg = {**TINY_CONFIG, **(config or {})}
    g = torch.Generator().manual_seed(seed)
    return FluxInputs(
        hidden_states=torch.randn(batch, h * w, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, txt, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=latent_image_ids(h, w),
        txt_ids=torch.zeros(txt, 3),
        guidance=torch.full((batch,), 3.5),
    )


def save_tiny_teacher(root, seed: int = 0, **overrides):
    """A tiny FLUX teacher saved as a diffusers pipeline root (transformer/ + model_index.json)."""
    import json
    from pathlib import Path

    root = Path(root)
    model = tiny_flux(seed, **overrides)
    model.save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return model


def write_precomputed_shards(folder, shards: int = 2, per_shard: int = 6, latent=(16, 4, 4), text_tokens: int = 6,
                             dim: int = 16, pooled_dim=None, seed: int = 0) -> str:
    """Synthetic shards in ``d2m precompute``'s output format; returns their brace pattern."""
    import io
    import json
    from pathlib import Path

    import numpy as np
    import webdataset as wds

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        return buf.getvalue()

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"pre-{s:06d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(per_shard):
                tar.write({"__key__": f"{s}{i:05d}", "txt": f"prompt {s}-{i}".encode(),
                           "json": json.dumps({"original_size": [8 * latent[1], 8 * latent[2]]}).encode(),
                           "latent.npy": npy(rng.standard_normal(latent).astype(np.float32)),
                           "prompt_embeds.npy": npy(rng.standard_normal((text_tokens, dim)).astype(np.float32)),
                           "pooled.npy": npy(rng.standard_normal(pooled_dim or dim).astype(np.float32))})
    return str(folder / f"pre-{{000000..{shards - 1:06d}}}.tar")


def assert_engine_matches_plain(plain, engine, inputs, atol: float = 1e-6) -> None:
    """The same velocity and the same tapped block features from a teacher engine and the plain teacher."""
    from d2m_dist.distill.taps import tapped
    from d2m_dist.models.flux import call_flux

    with torch.no_grad(), tapped(plain, detach=True) as fa:
        ya = call_flux(plain, inputs)
    with torch.no_grad(), tapped(engine.module, detach=True) as fb:
        yb = call_flux(engine, inputs)
    torch.testing.assert_close(yb, ya, rtol=0, atol=atol)
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=0, atol=atol)


# ----------------------------------------------------------------------------- a tiny FLUX pipeline folder

WORDS = "a photo of red blue cat dog on the grass".split()


def save_word_tokenizer(root, clip: bool) -> int:
    """A word-level tokenizer saved as a transformers fast tokenizer (T5-like, or CLIP-like with BOS); its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<s> $A </s>" if clip else "$A </s>"
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 2), ("</s>", 3)])
    # CLIP pads with its end token, T5 with <pad>; CLIP's tokenizer is capped at 77 tokens
    if clip:
        kwargs = dict(pad_token="</s>", bos_token="<s>", model_max_length=77)
    else:
        kwargs = dict(pad_token="<pad>", model_max_length=512)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", **kwargs).save_pretrained(root)
    return len(vocab)


def save_tiny_flux_pipeline(root, transformer=None, *, latent_channels: int = 4, t5_width: int = 24,
                            clip_width: int = 12):
    """A FLUX pipeline folder built from configs: 4-level VAE (8x down), T5, CLIP, word tokenizers, FLUX's
    dynamically shifted flow-matching scheduler, and ``transformer`` (None: no transformer/). The defaults
    fit :data:`TINY_CONFIG` (16 input channels = 4 x 4 latent channels, text widths 24 and 12)."""
    from pathlib import Path

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(root)
    vocab = save_word_tokenizer(root / "tokenizer_2", clip=False)
    save_word_tokenizer(root / "tokenizer", clip=True)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=t5_width, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=clip_width, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=2, eos_token_id=3, pad_token_id=3))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=latent_channels,
                        norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
    # FLUX.1-dev's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"), text_encoder_2=t5.eval(),
                        tokenizer_2=AutoTokenizer.from_pretrained(root / "tokenizer_2"), transformer=transformer)
    pipe.save_pretrained(root)
    return root
