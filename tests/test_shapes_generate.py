"""The shapes world: scene generator, WebDataset shards, and the shipped models load and see the world."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffedit.shapes import scenes

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = scenes.make_scene(3, 17), scenes.make_scene(3, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.info == b.info
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert not np.array_equal(a.image, scenes.make_scene(4, 17).image)
    assert not np.array_equal(a.image, scenes.make_scene(3, 18).image)


@pytest.mark.parametrize("index", range(40))
def test_masks_match_object_pixels_and_caption_names_objects(index):
    s = scenes.make_scene(0, index)
    objects = s.info["objects"]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert 1 <= len(objects) == len(s.masks) <= scenes.MAX_OBJECTS
    union = np.zeros((64, 64), bool)
    for obj, mask in zip(objects, s.masks):
        assert not (union & mask).any(), "visible masks of different objects never overlap"
        union |= mask
        assert obj["area"] == mask.sum() > 0
        x0, y0, x1, y1 = obj["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # the pixels inside the mask carry the object's colour (away from anti-aliased edges)
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        if inner.sum() >= 5:
            mean = s.image[inner].astype(float).mean(0)
            assert np.abs(mean - obj["rgb"]).max() < 3
        assert f"{obj['color']} {obj['shape']}" in s.caption
    bg = s.info["background"]
    assert s.caption.endswith(f"{bg['color']} background")
    assert (bg["texture"] in s.caption) == (bg["texture"] != "plain")


def test_captions_fit_the_shipped_tokenizer():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(MODELS / "shapes-ldm" / "tokenizer")
    caption = scenes.make_caption(
        [{"color": "orange", "shape": "triangle"}, {"color": "white", "shape": "star"}, {"color": "green", "shape": "circle"}],
        {"color": "beige", "texture": "checkered"},
    )
    assert caption == "an orange triangle, a white star and a green circle on a checkered beige background"
    ids = tok(caption).input_ids
    assert len(ids) <= tok.model_max_length == 32  # the longest kind of caption is never truncated
    assert tok.decode(ids, skip_special_tokens=True).strip() == caption.replace(",", " ,") or tok.decode(ids, skip_special_tokens=True).strip() == caption
    # write_clip_tokenizer's merges make most of the world's words single tokens (not all: see docs/TRAINING.md)
    single = [w for w in scenes.WORDS if len(tok.tokenize(w)) == 1]
    assert len(single) >= 15


def test_shards_read_back_with_webdataset(tmp_path):
    import webdataset as wds

    paths = scenes.write_shards(tmp_path, shards=2, per_shard=3, seed=5)
    assert [p.name for p in paths] == ["shapes-0000005-00000.tar", "shapes-0000005-00001.tar"]
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert len(samples) == 6
    for i, sample in enumerate(samples):
        s = scenes.make_scene(5, i)
        info = json.loads(sample["json"])
        n = len(info["objects"])
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"png", "txt", "json"} | {f"mask_{k}.png" for k in range(n)}
        assert sample["__key__"] == f"0000005_{i:08d}"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), s.image)
        assert sample["txt"].decode() == s.caption
        for k in range(n):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample[f"mask_{k}.png"]))) > 0, s.masks[k])


def test_cli_generate(tmp_path):
    assert scenes.main(["generate", "--out", str(tmp_path), "--shards", "1", "--per-shard", "2", "--seed", "1"]) == 0
    assert (tmp_path / "shapes-0000001-00000.tar").is_file()


def test_shipped_ldm_loads_in_diffusers():
    from diffusers import StableDiffusionPipeline

    folder = MODELS / "shapes-ldm"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    assert json.loads((folder / "diffedit.json").read_text()) == {"threshold": 0.75}  # chosen by bench/tune_defaults.py
    # every word of the world is one token of the shipped tokenizer
    assert [w for w in scenes.WORDS if len(pipe.tokenizer(w, add_special_tokens=False).input_ids) != 1] == []


def test_shipped_flow_model_loads_in_diffusers_and_draws_the_world():
    """The rectified-flow model loads in diffusers' own SD3 pipeline (no T5) and draws held-out captions in the
    right colour (docs/TRAINING.md: 64 of 64 at 50 steps, guidance 3)."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from diffedit.shapes.check_samples import judge

    folder = MODELS / "shapes-flow"
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.sample_size == 16
    assert [w for w in scenes.WORDS if len(pipe.tokenizer(w, add_special_tokens=False).input_ids) != 1] == []
    held = [s for s in (scenes.make_scene(0, i) for i in range(12)) if len(s.info["objects"]) == 1][:4]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([s.caption for s in held], num_inference_steps=30, guidance_scale=3.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    colours = [judge((img * 255).round().astype(np.uint8), s.info["objects"][0]["color"], s.info["objects"][0]["shape"])[0]
               for img, s in zip(images, held)]
    assert sum(colours) >= 3, colours


def test_shipped_weights_fit_the_budget():
    """The three shipped models together stay within 24 MB, so the repository travels whole."""
    size = sum(f.stat().st_size for name in ("shapes-ldm", "shapes-clip", "shapes-flow") for f in (MODELS / name).rglob("*")
               if f.is_file())
    assert size <= 24e6, f"shipped models take {size / 1e6:.2f} MB"


def test_shipped_clip_prefers_the_true_caption():
    """The shipped CLIP, loaded by open_clip from its folder as a user would, tells colour and shape apart."""
    import open_clip
    import torch

    name = "local-dir:" + str((MODELS / "shapes-clip").resolve())
    model, _, preprocess = open_clip.create_model_and_transforms(name)  # loads open_clip_model.safetensors
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    wins, n = {"color": 0, "shape": 0}, 16
    for i in range(n):
        s = scenes.make_scene(0, i)
        obj = s.info["objects"][0]
        wrong = {
            "color": (next(c for c in scenes.COLORS if c != obj["color"]), obj["shape"]),
            "shape": (obj["color"], next(x for x in scenes.SHAPES if x != obj["shape"])),
        }
        for kind, (color, shape) in wrong.items():
            article = "an" if color[0] in "aeiou" else "a"
            false_caption = s.caption.replace(f"{obj['color']} {obj['shape']}", f"{color} {shape}", 1)
            false_caption = false_caption.replace(f"an {color} {shape}", f"{article} {color} {shape}")
            false_caption = false_caption.replace(f"a {color} {shape}", f"{article} {color} {shape}")
            with torch.no_grad():
                img = model.encode_image(preprocess(Image.fromarray(s.image))[None], normalize=True)
                txt = model.encode_text(tokenizer([s.caption, false_caption]), normalize=True)
            sims = (img @ txt.T)[0]
            wins[kind] += int(sims[0] > sims[1])
    assert wins["color"] >= 0.75 * n and wins["shape"] >= 0.75 * n, wins
