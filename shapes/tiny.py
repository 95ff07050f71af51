"""Tiny *real* Stable Diffusion models built on the spot, for tests, demos and offline benchmarks.

No weights can be downloaded here, so tests build the same component classes Stable Diffusion uses
(UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIM scheduler), with a few
thousand random parameters, save them in the standard diffusers folder layout and load them back
through :func:`diffedit.stages.model.load_model`, the code path users' checkpoints take.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A small English vocabulary for the word-level merges of the tiny tokenizer; any other word still
# tokenizes (into characters), as with a real BPE vocabulary.
DEFAULT_WORDS = (
    "a an the of and on with in photo picture image background "
    "red green blue yellow purple orange white black gray grey cyan magenta pink brown "
    "circle circles square squares triangle triangles star stars cross ring diamond "
    "dog dogs cat cats fox horse bowl fruit small large big tiny"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding as CLIP's tokenizer runs it: merge the lowest-ranked adjacent pair until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks[p], p) for p in zip(symbols, symbols[1:]) if p in ranks]
        if not pairs:
            break
        _, (a, b) = min(pairs)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def write_clip_tokenizer(out_dir: str | Path, words=DEFAULT_WORDS, model_max_length: int = 77) -> Path:
    """Write a valid CLIP BPE tokenizer (vocab.json, merges.txt) whose merges spell out ``words``.

    Every byte is in the vocabulary, so any text tokenizes; each listed word becomes a single token.
    Loadable with ``transformers.CLIPTokenizer.from_pretrained(out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    known = set(vocab_list)
    for word in dict.fromkeys(w.lower() for w in words):
        # Tokenize the word with the merges so far, then chain its pieces into one token with new merges.
        # New merges rank after every earlier one, so they never change how an earlier word tokenizes;
        # chaining the *pieces* (not the characters) keeps earlier merges from splitting this word.
        pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        left = pieces[0]
        for right in pieces[1:]:
            merged = left + right
            if (left, right) not in ranks:
                ranks[(left, right)] = len(merges)
                merges.append((left, right))
            if merged not in known:
                vocab_list.append(merged)
                known.add(merged)
            left = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
            }
        )
    )
    return out


def save_sd_folder(out: str | Path, *, vae, text_encoder, tokenizer, unet, scheduler, dtype=None) -> Path:
    """Save Stable Diffusion components as a diffusers folder (model_index.json layout, safetensors)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if dtype is not None:
        pipe.to(dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)


def build_tiny_model(
    out_dir: str | Path,
    *,
    sample_size: int = 16,
    prediction_type: str = "epsilon",
    block_out_channels=(8, 16),
    cross_attention_dim: int = 16,
    seed: int = 0,
    words=DEFAULT_WORDS,
) -> Path:
    """Build a tiny Stable-Diffusion-shaped model with random weights and save it as a diffusers folder.

    ``sample_size`` is the latent size; the VAE downsamples by 2 per extra block (here 2x, so the image
    resolution is ``2 * sample_size``). Weights are written as safetensors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    tok_dir = write_clip_tokenizer(out / "_tokenizer_src", words)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
    )
    text_encoder = clip_text_encoder(tokenizer, width=cross_attention_dim, mlp_width=32, heads=2, max_positions=77)
    scheduler = sd_ddim_scheduler(prediction_type)
    save_sd_folder(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out


def clip_text_encoder(tokenizer, width: int, mlp_width: int, heads: int, max_positions: int, layers: int = 2):
    """A CLIP text encoder with random weights over ``tokenizer``'s vocabulary and special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=mlp_width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion 1.x's DDIM scheduler: scaled_linear betas 0.00085-0.012 over 1000 steps, leading spacing,
    steps_offset 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


# -- tiny models of the other families (SDXL, Stable Diffusion 3.x, FLUX.1), same idea -----------------------------


def write_t5_tokenizer(out_dir: str | Path, words=DEFAULT_WORDS) -> Path:
    """Write a valid T5 (SentencePiece Unigram) tokenizer whose pieces are ``words`` and every lowercase letter, so
    any lowercase text tokenizes: ids 0 <pad>, 1 </s>, 2 <unk>, as T5's. Loadable with
    ``transformers.T5TokenizerFast.from_pretrained(out_dir)``."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz0123456789,.'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(w.lower() for w in words)]
    vocab += [(c, -5.0) for c in letters] + [("\u2581" + c, -5.0) for c in letters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def _tiny_vae(sample_size: int, **flow):
    """A two-block AutoencoderKL (8x fewer channels than anything real; factor 2), 4 latent channels. ``flow``: the
    rectified-flow families' shift_factor and scaling_factor, and no quant convs (their VAEs have none)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=sample_size, **flow)


def _clip(tokenizer, width: int, projection: int | None = None):
    """A two-layer CLIP text encoder; with ``projection``, the CLIPTextModelWithProjection SDXL and SD3 use."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=projection or width, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _tokenizers(out: Path, words, t5: bool):
    """(CLIP tokenizer, T5 tokenizer or None), written to scratch folders under ``out`` and loaded back."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "_clip_src", words))
    t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(out / "_t5_src", words)) if t5 else None
    return clip, t5_tokenizer


def _save(pipe, out: Path) -> Path:
    """Save ``pipe`` in the diffusers layout (safetensors) and remove the tokenizers' scratch folders."""
    import shutil

    pipe.save_pretrained(out, safe_serialization=True)
    for scratch in ("_clip_src", "_t5_src"):
        shutil.rmtree(out / scratch, ignore_errors=True)
    return out


def build_tiny_sdxl(out_dir: str | Path, *, sample_size: int = 16, seed: int = 0, words=DEFAULT_WORDS) -> Path:
    """A tiny SDXL (two CLIP encoders of width 16, the second with a projection; a UNet with text_time added
    conditioning), random weights, saved as a StableDiffusionXLPipeline folder. Image size 2 x ``sample_size``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = Path(out_dir)
    tokenizer, _ = _tokenizers(out, words, t5=False)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, norm_num_groups=4, use_linear_projection=True, cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(2 * sample_size), text_encoder=_clip(tokenizer, 16), text_encoder_2=_clip(tokenizer, 16, 16),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=_sdxl_scheduler(), force_zeros_for_empty_prompt=True)
    return _save(pipe, out)


def _sdxl_scheduler():
    """SDXL's scheduler config (scaled_linear 0.00085-0.012, leading spacing, steps_offset 1), as DDIM."""
    return sd_ddim_scheduler("epsilon")


def build_tiny_sd3(out_dir: str | Path, *, t5: bool = True, sample_size: int = 16, seed: int = 0,
                   words=DEFAULT_WORDS) -> Path:
    """A tiny Stable Diffusion 3 (an SD3Transformer2DModel of two layers, two CLIP encoders with projections, a T5
    encoder unless ``t5`` is False: then the folder's model_index.json names none, as diffusers saves
    ``text_encoder_3=None``), random weights, with SD3's FlowMatchEulerDiscreteScheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = Path(out_dir)
    tokenizer, t5_tokenizer = _tokenizers(out, words, t5=t5)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(2 * sample_size, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                      use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 16, 16), tokenizer=tokenizer, text_encoder_2=_clip(tokenizer, 16, 16),
        tokenizer_2=tokenizer, text_encoder_3=_t5(t5_tokenizer, 32) if t5 else None, tokenizer_3=t5_tokenizer)
    return _save(pipe, out)


def build_tiny_flux(out_dir: str | Path, *, guidance_embeds: bool = True, seed: int = 0, words=DEFAULT_WORDS) -> Path:
    """A tiny FLUX.1 (a FluxTransformer2DModel of one double and one single block over 2 x 2 packed latents; dev's
    guidance embedding, or none as schnell), CLIP and T5 encoders, random weights, with FLUX.1-dev's dynamically
    shifted FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = Path(out_dir)
    tokenizer, t5_tokenizer = _tokenizers(out, words, t5=True)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 4, 8), guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_tiny_vae(32, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip(tokenizer, 16), tokenizer=tokenizer, text_encoder_2=_t5(t5_tokenizer, 32),
        tokenizer_2=t5_tokenizer)
    return _save(pipe, out)
