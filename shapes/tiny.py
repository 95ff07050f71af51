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
