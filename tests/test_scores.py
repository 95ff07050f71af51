"""Edit quality scores, each checked against an independent computation on fixed inputs.

CLIP against open_clip's own encode_image / encode_text on a tiny CLIP with random weights (built here,
saved as safetensors: the scorer must load exactly those weights); LPIPS against the lpips package loading
the same backbone weights itself (through torchvision and torch hub's cache); PSNR and SSIM against
scikit-image; directional CLIP against its formula. Large and extreme images (issue item 12): the sizes
SSIM / LPIPS / CLIP see, and a 6-megapixel photo and a 1 x 300000 strip scored in a child process whose
address space may grow by 2 GB only.
"""

import json
import os
import subprocess
import sys
import warnings

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.stages import scores, sources
from diffedit.stages.config import ScoreConfig
from diffedit.stages.sources import CLIP_COLUMNS, ScoreLoadError, describe_scores, lpips_backbone_cache_file
from diffedit.stages.scores import (
    SCORE_COLUMNS,
    Scorer,
    directional_similarity,
    gaussian_filter,
    mask_fraction,
    region_mean,
    region_psnr,
    ssim_map,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def perturbed(image, seed, amount=40):
    noise = np.random.default_rng(seed).integers(-amount, amount + 1, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


def box_mask(h, w, top, left, bottom, right):
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A folder as the shapes CLIP ships: a raw open_clip model config JSON + open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip-test"
    folder.mkdir()
    config = folder / "tiny-clip-test.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache of its own for the test: $TORCH_HOME/hub, as torch and stages.sources find it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub"


@pytest.fixture
def no_default_clip(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SHIPPED_CLIP", tmp_path / "no-such-clip")


def random_alexnet_state(seed=1):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.alexnet().state_dict()


# -- directional CLIP ----------------------------------------------------------------------------------


def test_directional_clip_is_instructpix2pix_formula():
    rng = np.random.default_rng(3)
    src_img, edt_img, src_txt, tgt_txt = (rng.normal(size=(5, 12)) * rng.uniform(0.5, 4, (5, 1)) for _ in range(4))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    d_img, d_txt = unit(edt_img) - unit(src_img), unit(tgt_txt) - unit(src_txt)
    expected = (d_img * d_txt).sum(1) / np.linalg.norm(d_img, axis=1) / np.linalg.norm(d_txt, axis=1)
    got = directional_similarity(*(torch.from_numpy(x) for x in (src_img, edt_img, src_txt, tgt_txt)))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    # Hand-made: the image moves exactly as the text does (+1), or exactly against it (-1).
    e = torch.eye(2)
    assert directional_similarity(e[:1], e[1:], 3 * e[:1], 5 * e[1:]).item() == pytest.approx(1.0, abs=1e-6)
    assert directional_similarity(e[1:], e[:1], e[:1], e[1:]).item() == pytest.approx(-1.0, abs=1e-6)


# -- CLIP plumbing ---------------------------------------------------------------------------------------


def reference_clip_scores(folder, sources, edits, source_prompts, target_prompts):
    """open_clip called directly: its own transform, encode_image / encode_text, normalised, then cosines."""
    import open_clip

    open_clip.add_model_config(folder / "tiny-clip-test.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip-test", pretrained=str(folder / "open_clip_model.safetensors")
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        img = lambda xs: model.encode_image(torch.stack([preprocess(Image.fromarray(x)) for x in xs]))  # noqa: E731
        txt = lambda ps: model.encode_text(tokenizer(ps))  # noqa: E731
        si, ei, st, tt = (F / F.norm(dim=-1, keepdim=True) for F in (img(sources), img(edits), txt(source_prompts), txt(target_prompts)))
    cos = lambda a, b: (a * b).sum(-1)  # noqa: E731 (unit vectors)
    d_img, d_txt = ei - si, tt - st
    return {
        "clip_source": cos(ei, st),
        "clip_target": cos(ei, tt),
        "clip_directional": cos(d_img, d_txt) / d_img.norm(dim=-1) / d_txt.norm(dim=-1),
        "clip_image": cos(si, ei),
    }


def test_clip_scores_match_open_clip(tiny_clip_dir, hub_dir):
    sources = [rgb(64, 64, 0), rgb(40, 56, 1), rgb(64, 64, 2)]  # two sizes, one non-square
    edits = [perturbed(s, 10 + i) for i, s in enumerate(sources)]
    masks = [box_mask(*s.shape[:2], 5, 5, 30, 30) for s in sources]
    sp = ["a red circle", "a red circle", "a green star on a white background"]
    tp = ["a blue circle", "a red square", "a yellow star on a white background"]
    scorer = Scorer(ScoreConfig(clip_model=str(tiny_clip_dir), device="cpu", batch_size=2))  # 2: batches split
    assert scorer.unavailable == {"lpips": scorer.unavailable["lpips"]}  # CLIP loaded; only LPIPS lacks weights
    got = scorer.score(sources, [Image.fromarray(e) for e in edits], masks, sp, tp)
    expected = reference_clip_scores(tiny_clip_dir, sources, edits, sp, tp)
    for column in CLIP_COLUMNS:
        np.testing.assert_allclose(got[column], expected[column].numpy(), rtol=0, atol=1e-5, err_msg=column)
    # Random weights still give distinct values per pair: the comparison above would see a mix-up.
    assert len(set(np.round(got["clip_directional"], 6))) == 3
    # A pair scored alone scores the same as in a batch.
    alone = scorer.score(sources[1:2], edits[1:2], masks[1:2], sp[1:2], tp[1:2])
    for column in SCORE_COLUMNS:
        if got[column][1] is None:
            assert alone[column][0] is None, column
        else:
            assert alone[column][0] == pytest.approx(got[column][1], abs=1e-5), column
    describe = scorer.describe()
    assert describe["clip"]["weights"] == str(tiny_clip_dir / "open_clip_model.safetensors")
    assert len(describe["clip"]["sha256"]) == 64


def test_clip_loads_hub_layout_folder_and_architecture_name(tiny_clip_dir, tmp_path, hub_dir):
    """open_clip's hub layout (open_clip_config.json with model_cfg) and NAME + weights give the same scores."""
    hub_layout = tmp_path / "hub-layout"
    hub_layout.mkdir()
    (hub_layout / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    (hub_layout / "open_clip_model.safetensors").write_bytes((tiny_clip_dir / "open_clip_model.safetensors").read_bytes())
    pair = ([rgb(48, 48, 5)], [rgb(48, 48, 6)], [box_mask(48, 48, 0, 0, 10, 10)], ["a dog"], ["a cat"])
    by_folder = Scorer(ScoreConfig(clip_model=str(tiny_clip_dir), device="cpu")).score(*pair)
    by_hub_layout = Scorer(ScoreConfig(clip_model=str(hub_layout), device="cpu")).score(*pair)
    by_name = Scorer(
        ScoreConfig(clip_model="tiny-clip-test", clip_weights=str(tiny_clip_dir / "open_clip_model.safetensors"), device="cpu")
    ).score(*pair)
    for column in CLIP_COLUMNS:
        assert by_hub_layout[column][0] == pytest.approx(by_folder[column][0], abs=1e-6)
        assert by_name[column][0] == pytest.approx(by_folder[column][0], abs=1e-6)


def test_clip_refuses_random_or_pickled_weights(tiny_clip_dir, tmp_path, no_default_clip, hub_dir):
    with pytest.raises(ScoreLoadError, match="never scores with random weights"):
        Scorer(ScoreConfig(clip_model="ViT-B-32", device="cpu"))
    pickled = tmp_path / "clip.pt"
    torch.save({}, pickled)
    with pytest.raises(ScoreLoadError, match="safetensors only"):
        Scorer(ScoreConfig(clip_model="ViT-B-32", clip_weights=str(pickled), device="cpu"))
    with pytest.raises(ScoreLoadError, match="does not exist"):
        Scorer(ScoreConfig(clip_model="ViT-B-32", clip_weights=str(tmp_path / "missing.safetensors"), device="cpu"))
    with pytest.raises(ScoreLoadError, match="not a folder|neither a folder"):
        Scorer(ScoreConfig(clip_model="no-such-architecture", clip_weights="x.safetensors", device="cpu"))
    empty = tmp_path / "empty-clip"
    empty.mkdir()
    (empty / "tiny.json").write_text(json.dumps(TINY_CLIP))
    with pytest.raises(ScoreLoadError, match="no .safetensors"):
        Scorer(ScoreConfig(clip_model=str(empty), device="cpu"))
    # Weights of another shape are refused (strict loading), not partially loaded.
    from safetensors.torch import save_file

    other = tmp_path / "other-clip"
    other.mkdir()
    (other / "other.json").write_text(json.dumps({**TINY_CLIP, "embed_dim": 8}))
    save_file({"logit_scale": torch.ones(())}, str(other / "open_clip_model.safetensors"))
    with pytest.raises(ScoreLoadError, match="Could not load CLIP"):
        Scorer(ScoreConfig(clip_model=str(other), device="cpu"))


def test_missing_default_clip_gives_nulls_with_a_reason(no_default_clip, hub_dir):
    scorer = Scorer(ScoreConfig(device="cpu"))
    assert set(scorer.unavailable) == set(CLIP_COLUMNS) | {"lpips"}
    assert "no CLIP weights" in scorer.unavailable["clip_target"] and "no-such-clip" in scorer.unavailable["clip_target"]
    assert "alexnet-owt-7be5be79.pth" in scorer.unavailable["lpips"]
    out = scorer.score([rgb(40, 40, 0)], [rgb(40, 40, 1)], [box_mask(40, 40, 0, 0, 20, 20)], ["a"], ["b"])
    assert all(out[c] == [None] for c in CLIP_COLUMNS + ("lpips",))
    assert out["psnr_bg"][0] is not None and out["mask_fraction"][0] == pytest.approx(0.25)
    assert scorer.describe()["unavailable"] == scorer.unavailable


def test_default_clip_is_the_shipped_folder(tiny_clip_dir, monkeypatch, hub_dir):
    monkeypatch.setattr(sources, "SHIPPED_CLIP", tiny_clip_dir)
    scorer = Scorer(ScoreConfig(device="cpu"))
    assert scorer.clip is not None and not set(CLIP_COLUMNS) & set(scorer.unavailable)


# -- LPIPS -----------------------------------------------------------------------------------------------


def test_lpips_matches_the_package_with_the_same_backbone(hub_dir, no_default_clip):
    """The lpips package loads the backbone itself (torchvision, from torch hub's cache); so does the scorer."""
    import lpips
    from safetensors.torch import save_file

    cached = lpips_backbone_cache_file("alex")
    cached.parent.mkdir(parents=True)
    torch.save(random_alexnet_state(), cached)  # a random AlexNet where torchvision's would be cached
    reference = lpips.LPIPS(net="alex", verbose=False)  # pretrained lin layers + backbone from the cache
    sources = [rgb(64, 64, 0), rgb(64, 64, 1), rgb(48, 80, 2), rgb(16, 16, 3)]
    edits = [perturbed(s, 20 + i) for i, s in enumerate(sources)]
    edits[1] = sources[1].copy()  # identical pair
    masks = [box_mask(*s.shape[:2], 0, 0, 8, 8) for s in sources]
    scorer = Scorer(ScoreConfig(device="cpu", batch_size=3))
    assert "lpips" not in scorer.unavailable
    got = scorer.score(sources, edits, masks, ["a"] * 4, ["b"] * 4)["lpips"]
    to_tensor = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        expected = [reference(to_tensor(s), to_tensor(e)).item() for s, e in zip(sources[:3], edits[:3])]
    np.testing.assert_allclose(got[:3], expected, rtol=1e-5, atol=1e-6)
    assert got[0] > 0 and got[1] == pytest.approx(0.0, abs=1e-6)
    assert got[3] is None  # 16 x 16 is too small for AlexNet's pooling stages
    # The same backbone given explicitly, as safetensors, with an empty cache: the same scores.
    explicit = hub_dir.parent / "alexnet.safetensors"
    save_file(random_alexnet_state(), str(explicit))
    cached.unlink()
    again = Scorer(ScoreConfig(device="cpu", lpips_weights=str(explicit)))
    np.testing.assert_allclose(again.score(sources[:3], edits[:3], masks[:3], ["a"] * 3, ["b"] * 3)["lpips"], expected, rtol=1e-5, atol=1e-6)
    assert again.describe()["lpips"]["weights"] == str(explicit)


def test_lpips_without_backbone_weights(hub_dir, no_default_clip, tmp_path):
    scorer = Scorer(ScoreConfig(device="cpu"))
    assert scorer.lpips is None and "torch hub's cache" in scorer.unavailable["lpips"]
    with pytest.raises(ScoreLoadError, match="does not exist"):
        Scorer(ScoreConfig(device="cpu", lpips_weights=str(tmp_path / "missing.pth")))
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ScoreLoadError):
        Scorer(ScoreConfig(device="cpu", lpips_weights=str(wrong)))


# -- describing the scorers without loading them ---------------------------------------------------------


def test_describe_scores_says_what_the_scorer_says_without_loading_a_model(hub_dir, tmp_path, monkeypatch):
    """The job's driver describes the scores from names and files alone; the Scorer, having loaded them, agrees."""
    import lpips
    import open_clip

    cached = sources.lpips_backbone_cache_file("alex")
    cached.parent.mkdir(parents=True)
    torch.save(random_alexnet_state(), cached)
    shipped = ScoreConfig(device="cpu")  # the shipped shapes CLIP; LPIPS-alex from the cache
    no_vgg = ScoreConfig(device="cpu", lpips_net="vgg")  # not in the cache: a null with a reason
    no_clip = ScoreConfig(device="cpu", clip_model="ViT-B-32", clip_weights=str(tmp_path / "missing.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("describe_scores built a model or loaded weights")

    with monkeypatch.context() as m:
        for module, name in [(open_clip, "create_model_and_transforms"), (open_clip, "load_checkpoint"),
                             (lpips, "LPIPS"), (torch, "load")]:
            m.setattr(module, name, refuse)
        described = [describe_scores(shipped), describe_scores(no_vgg)]
        with pytest.raises(ScoreLoadError, match="does not exist"):  # as Scorer(no_clip) raises
            describe_scores(no_clip)
    assert described == [Scorer(shipped).describe(), Scorer(no_vgg).describe()]
    assert described[0]["clip"]["model"] == f"local-dir:{sources.SHIPPED_CLIP}" and len(described[0]["clip"]["sha256"]) == 64
    assert described[0]["lpips"]["weights"] == str(cached) and described[0]["unavailable"] == {}
    assert described[1]["lpips"] is None and "vgg16" in described[1]["unavailable"]["lpips"]
    # The default CLIP missing: nulls with the same reason, both ways.
    monkeypatch.setattr(sources, "SHIPPED_CLIP", tmp_path / "no-such-clip")
    assert describe_scores(shipped) == Scorer(shipped).describe()
    assert describe_scores(shipped)["clip"] is None and "no-such-clip" in describe_scores(shipped)["unavailable"]["clip_image"]


def test_mask_fraction_of_pil_images_and_arrays():
    m = box_mask(10, 20, 0, 0, 5, 8)  # 40 of 200 pixels
    as_255 = m.astype(np.uint8) * 255
    for mask in (m, as_255, Image.fromarray(as_255), Image.fromarray(m)):
        assert mask_fraction(mask) == 0.2
    with pytest.raises(ValueError, match="H x W"):
        mask_fraction(np.zeros((4, 4, 3)))


# -- PSNR and SSIM ---------------------------------------------------------------------------------------


@pytest.fixture
def skimage_metrics():
    return pytest.importorskip("skimage.metrics", reason="scikit-image is the independent reference for PSNR / SSIM")


def skimage_ssim_map(skimage_metrics, a, b):
    _, S = skimage_metrics.structural_similarity(
        a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )
    return S.mean(axis=2)


def test_gaussian_filter_matches_scipy():
    scipy_ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is the independent reference for the blur")
    scipy_gaussian = scipy_ndimage.gaussian_filter

    rng = np.random.default_rng(0)
    for shape in [(20, 31), (4, 6), (1, 9)]:  # also smaller than the 11-tap window: repeated reflection
        x = rng.uniform(size=shape)
        got = gaussian_filter(torch.from_numpy(x)[None], sigma=1.5, truncate=3.5)[0].numpy()
        np.testing.assert_allclose(got, scipy_gaussian(x, sigma=1.5, truncate=3.5, mode="reflect"), rtol=0, atol=1e-12)


def test_psnr_and_ssim_match_skimage_on_full_images_and_regions(no_default_clip, hub_dir, skimage_metrics):
    sources = [rgb(37, 53, 0), rgb(64, 64, 1)]
    edits = [perturbed(sources[0], 5, 30), perturbed(sources[1], 6, 60)]
    masks = [box_mask(37, 53, 4, 9, 30, 40), box_mask(64, 64, 0, 0, 64, 20)]
    got = Scorer(ScoreConfig(device="cpu")).score(sources, edits, masks, ["a", "b"], ["c", "d"])
    for i, (s, e, m) in enumerate(zip(sources, edits, masks)):
        a, b = s / 255.0, e / 255.0
        S = skimage_ssim_map(skimage_metrics, a, b)
        psnr = lambda region: skimage_metrics.peak_signal_noise_ratio(a[region], b[region], data_range=1.0)  # noqa: E731
        assert got["psnr_bg"][i] == pytest.approx(psnr(~m), abs=1e-9)
        assert got["psnr_fg"][i] == pytest.approx(psnr(m), abs=1e-9)
        # The scorer's SSIM runs in float32 (the region means within 1e-6 of float64; the map itself is checked
        # against scikit-image in float64 below, at 1e-9).
        assert got["ssim_bg"][i] == pytest.approx(S[~m].mean(), abs=1e-6)
        assert got["ssim_fg"][i] == pytest.approx(S[m].mean(), abs=1e-6)
        assert got["mask_fraction"][i] == pytest.approx(m.mean())
        # Full images: the map itself, and skimage's scalar SSIM (the map's mean without a 5-pixel border).
        ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
        ours = ssim_map(ta, tb)[0]
        np.testing.assert_allclose(ours.numpy(), S, rtol=0, atol=1e-9)
        np.testing.assert_allclose(ssim_map(ta.float(), tb.float())[0].numpy(), S, rtol=0, atol=1e-5)
        interior = np.zeros(m.shape, bool)
        interior[5:-5, 5:-5] = True
        mssim = skimage_metrics.structural_similarity(
            a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert region_mean(ours[None], torch.from_numpy(interior)[None]).item() == pytest.approx(mssim, abs=1e-9)
        full = torch.ones(1, *m.shape, dtype=torch.bool)
        assert region_psnr(ta, tb, full).item() == pytest.approx(skimage_metrics.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    # A pair changed only inside the mask: the two regions must not be mixed up.
    s = rgb(40, 40, 7)
    e = s.copy()
    m = box_mask(40, 40, 10, 10, 30, 30)
    e[m] = 255 - e[m]  # changed only inside the mask
    out = Scorer(ScoreConfig(device="cpu")).score([s], [e], [m], ["a"], ["b"])
    assert out["psnr_bg"][0] == float("inf") and out["ssim_bg"][0] > out["ssim_fg"][0]
    assert out["psnr_fg"][0] < 10


def test_empty_regions_give_nulls(no_default_clip, hub_dir):
    s, e = rgb(32, 32, 0), rgb(32, 32, 1)
    out = Scorer(ScoreConfig(device="cpu")).score([s, s], [e, e], [np.zeros((32, 32)), np.ones((32, 32))], ["a"] * 2, ["b"] * 2)
    assert out["psnr_fg"][0] is None and out["ssim_fg"][0] is None and out["psnr_bg"][0] is not None
    assert out["psnr_bg"][1] is None and out["ssim_bg"][1] is None and out["psnr_fg"][1] is not None
    assert out["mask_fraction"] == [0.0, 1.0]


def test_bad_inputs_are_refused(no_default_clip, hub_dir):
    scorer = Scorer(ScoreConfig(device="cpu"))
    with pytest.raises(ValueError, match="must have one size"):
        scorer.score([rgb(32, 32, 0)], [rgb(32, 33, 1)], [np.zeros((32, 32))], ["a"], ["b"])
    with pytest.raises(ValueError, match="must be equal"):
        scorer.score([rgb(32, 32, 0)], [], [], ["a"], ["b"])
    with pytest.raises(ValueError, match="lpips_net"):
        ScoreConfig(lpips_net="resnet")


# -- bounded memory: large and extreme images (issue item 12) --------------------------------------------


def test_bounded_size_keeps_small_images_and_bounds_large_ones():
    limit = scores.SCORE_MAX_PIXELS
    for h, w in [(512, 512), (1024, 1024), (1, 300000), (37, 53)]:
        assert scores.bounded_size(h, w) == (h, w)
    for h, w in [(3000, 4000), (4000, 3000), (1025, 1024), (2, 3_000_000), (1, 10**7), (10**7, 1), (100_000, 99_999)]:
        bh, bw = scores.bounded_size(h, w)
        assert 1 <= bh <= h and 1 <= bw <= w and bh * bw <= limit, (h, w, bh, bw)
        if min(h, w) * (limit / (h * w)) ** 0.5 >= 1:  # the aspect ratio is kept, to a pixel, and the budget used
            assert abs(bh - h * bw / w) <= 1 and bh * bw > 0.99 * limit, (h, w, bh, bw)
    assert scores.bounded_size(4000, 3000) == (1182, 886)
    assert scores.bounded_size(1, 10**7) == (1, limit)  # thinner than a pixel: 1 pixel, the long side capped
    with pytest.raises(ValueError, match="max_pixels"):
        ScoreConfig(max_pixels=0)


def test_large_pairs_score_ssim_shrunk_and_psnr_at_full_size(no_default_clip, hub_dir, skimage_metrics):
    """Above max_pixels: PSNR and the mask fraction from every full-size pixel; SSIM on the box-averaged pair,
    averaged with each small pixel's share of the region as its weight."""
    h, w, limit = 97, 131, 40 * 30
    s = rgb(h, w, 0)
    e = perturbed(s, 1, 30)
    m = box_mask(h, w, 20, 30, 70, 90)
    out = Scorer(ScoreConfig(device="cpu", max_pixels=limit)).score([s], [e], [m], ["a"], ["b"])
    a, b = s / 255.0, e / 255.0
    psnr = lambda region: skimage_metrics.peak_signal_noise_ratio(a[region], b[region], data_range=1.0)  # noqa: E731
    assert out["psnr_bg"][0] == pytest.approx(psnr(~m), abs=1e-9)
    assert out["psnr_fg"][0] == pytest.approx(psnr(m), abs=1e-9)
    assert out["mask_fraction"][0] == m.mean()
    bh, bw = scores.bounded_size(h, w, limit)
    assert bh * bw <= limit
    box = lambda x, mode=None: np.asarray(Image.fromarray(x, mode).resize((bw, bh), Image.Resampling.BOX))  # noqa: E731
    S = skimage_ssim_map(skimage_metrics, box(s) / 255.0, box(e) / 255.0)
    for column, region in (("ssim_fg", m), ("ssim_bg", ~m)):
        weight = box(region.astype(np.float32), "F")
        assert 0 <= weight.min() and weight.max() <= 1  # each small pixel's share of the region
        assert out[column][0] == pytest.approx((S * weight).sum() / weight.sum(), abs=1e-6), column
    full = Scorer(ScoreConfig(device="cpu")).score([s], [e], [m], ["a"], ["b"])  # the same pair at its own size
    assert full["psnr_bg"][0] == out["psnr_bg"][0] and full["ssim_bg"][0] != out["ssim_bg"][0]


def test_identical_regions_give_psnr_inf_and_ssim_one(no_default_clip, hub_dir):
    """+inf PSNR exactly when every pixel of the region is unchanged (at full size); SSIM of an unchanged
    pair exactly 1, at its own size and shrunk."""
    s = rgb(90, 120, 3)
    m = box_mask(90, 120, 30, 40, 60, 80)
    pasted = s.copy()  # the edit changed inside the mask only; the background is the source's, pixel for pixel
    pasted[m] = 255 - pasted[m]
    one_pixel = s.copy()  # one background pixel off by one level: finite
    one_pixel[0, 0, 0] ^= 1
    for limit in (scores.SCORE_MAX_PIXELS, 50 * 40):
        scorer = Scorer(ScoreConfig(device="cpu", max_pixels=limit))
        out = scorer.score([s, s, s], [s.copy(), pasted, one_pixel], [m, m, m], ["a"] * 3, ["b"] * 3)
        assert out["psnr_bg"][:2] == [float("inf")] * 2 and out["psnr_fg"][0] == float("inf")
        assert 60 < out["psnr_bg"][2] < float("inf") and out["psnr_fg"][1] < 10
        assert out["ssim_bg"][0] == 1.0 and out["ssim_fg"][0] == 1.0
        assert out["ssim_fg"][1] < out["ssim_bg"][1] < 1.0  # the window reaches across the mask's border
    a = torch.from_numpy(s).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(ssim_map(a, a.clone()), torch.ones(1, 90, 120))


def test_ssim_in_float32_stays_close_to_float64_on_smooth_images():
    """Smooth, bright 8-bit images are float32's worst case for E[x^2] - E[x]^2 (4e-4 off without the shift)."""
    yy, xx = np.mgrid[0:128, 0:160] / 128
    smooth = np.stack([0.8 + 0.1 * np.sin(6 * xx), 0.5 + 0.3 * yy, 0.95 - 0.05 * xx * yy], -1)
    a = np.round(smooth * 255) / 255
    b = np.clip(np.round(smooth * 255) + np.random.default_rng(0).integers(-3, 4, smooth.shape), 0, 255) / 255
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
    s64, s32 = ssim_map(ta, tb)[0], ssim_map(ta.float(), tb.float())[0]
    assert s32.dtype == torch.float32 and s64.dtype == torch.float64
    np.testing.assert_allclose(s32.double().numpy(), s64.numpy(), rtol=0, atol=1e-5)
    assert s32.double().mean().item() == pytest.approx(s64.mean().item(), abs=1e-6)


def test_clip_of_long_strips_is_open_clips_centre_square(tiny_clip_dir, hub_dir):
    """Longer than 4:1, the scorer hands open_clip the centre square its transform keeps, made from that
    square's box alone; the scores are open_clip's own on the whole image."""
    from torchvision import transforms as T

    scorer = Scorer(ScoreConfig(clip_model=str(tiny_clip_dir), device="cpu"))
    sources = [rgb(1, 3000, 0), rgb(3000, 1, 1), rgb(10, 45, 2), rgb(40, 56, 3)]
    edits = [perturbed(x, 10 + i) for i, x in enumerate(sources)]
    masks = [np.zeros(x.shape[:2], bool) for x in sources]
    got = scorer.score(sources, edits, masks, ["a red circle"] * 4, ["a blue square"] * 4)
    expected = reference_clip_scores(tiny_clip_dir, sources, edits, ["a red circle"] * 4, ["a blue square"] * 4)
    for column in CLIP_COLUMNS:
        np.testing.assert_allclose(got[column], expected[column].numpy(), rtol=0, atol=1e-5, err_msg=column)
    assert scores.clip_ready(sources[0], scorer.clip.preprocess).size == (32, 32)
    assert scores.clip_ready(sources[3], scorer.clip.preprocess).size == (56, 40)  # up to 4:1: untouched
    # Another transform (squash) gets a 4:1 crop around the exact centre.
    strip = np.arange(301, dtype=np.uint8)[None, :, None].repeat(3, axis=2)
    crop = np.asarray(scores.clip_ready(strip, T.Compose([T.Resize((32, 32))])))
    assert crop.shape == (1, 5, 3) and crop[0, :, 0].tolist() == [148, 149, 150, 151, 152]


MEMORY_CHILD = """
import json, os, resource, sys, time
import numpy as np, torch
from diffedit.stages.scores import ScoreConfig, Scorer

torch.set_num_threads(2)
scorer = Scorer(ScoreConfig(device="cpu", lpips_weights=sys.argv[1]))
rng = np.random.default_rng(0)
photo = rng.integers(0, 256, (2000, 3000, 3), dtype=np.uint8)  # 6 megapixels (bench/score_memory.py: 12)
edit = photo.copy()
edit[500:1500, 1000:2000] //= 2
mask = np.zeros(photo.shape[:2], bool)
mask[500:1500, 1000:2000] = True
strip = rng.integers(0, 256, (1, 300000, 3), dtype=np.uint8)
scorer.score([photo[:64, :64]], [edit[:64, :64]], [mask[:64, :64]], ["a"], ["b"])  # first-call allocations
page = os.sysconf("SC_PAGE_SIZE")
virtual, rss = (int(v) * page for v in open("/proc/self/statm").read().split()[:2])
# The peak RSS so far (imports, the arrays above) is not the scorer's: reset it to the current RSS (Linux >= 4.0).
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # not allowed here: the peak then includes what came before (a stricter test)
    pass
# Allocations past the budget fail at once instead of taking the machine's memory (the old code needed about
# 23 GB for this photo, and one 4.9 GB image in the strip's CLIP resize).
resource.setrlimit(resource.RLIMIT_AS, (virtual + int(sys.argv[2]) * 2**20, resource.RLIM_INFINITY))
out = scorer.score([photo], [edit], [mask], ["a"], ["b"])
t = time.perf_counter()
out_strip = scorer.score([strip], [255 - strip], [np.zeros((1, 300000), bool)], ["a"], ["b"])
seconds = time.perf_counter() - t
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
grown = peak_kb * 1024 - rss
out = {k: out[k] + out_strip[k] for k in out}
print(json.dumps({"strip_seconds": seconds, "rss_growth_mb": grown / 2**20, "out": out}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_a_6_megapixel_photo_and_a_1x300000_strip_score_in_bounded_memory(tmp_path):
    """In a child process whose address space may grow by 2 GB at most (the old code failed both at once)."""
    from safetensors.torch import save_file

    alexnet = tmp_path / "alexnet.safetensors"
    save_file(random_alexnet_state(), str(alexnet))  # LPIPS runs too: its activations count
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2", "TORCH_HOME": str(tmp_path / "hub")}
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(alexnet), "2048"], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    out = result["out"]
    assert result["rss_growth_mb"] < 1024, result["rss_growth_mb"]
    assert result["strip_seconds"] < 10  # 0.1 s here unloaded (the old code: 30 s, 6.4 GB)
    assert all(out[c][1] is not None for c in CLIP_COLUMNS)  # the strip's CLIP scores exist
    assert out["lpips"][0] is not None and out["lpips"][1] is None  # 1 pixel high: too small for AlexNet
    assert out["psnr_fg"][0] < out["psnr_bg"][0] == float("inf") and out["ssim_bg"][0] > out["ssim_fg"][0]
    assert out["mask_fraction"] == [pytest.approx(1 / 6), 0.0]
    assert out["ssim_bg"][0] == pytest.approx(1.0, abs=0.01)  # unchanged outside, but for the mask's border


def test_the_lpips_cache_file_is_where_torch_and_torchvision_put_it(hub_dir):
    """stages.sources finds the backbone weights without importing torch: the same path torch hub would use."""
    import torchvision

    from diffedit.stages.config import LPIPS_BACKBONES

    weights = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
    for net in LPIPS_BACKBONES:
        url = getattr(torchvision.models, weights[net]).IMAGENET1K_V1.url
        expected = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        assert sources.lpips_backbone_cache_file(net) == expected


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_one_slice_at_a_time_equals_the_package_forward(net):
    """stages.scores.lpips_distance frees each layer before the next; the value is the package's own."""
    import lpips

    from diffedit.stages.scores import lpips_distance

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    a, b = torch.rand(2, 3, 3, 72, 96).mul(2).sub(1)
    with torch.no_grad():
        expected = model(a, b).flatten()
        got = lpips_distance(model, a, b)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got > 0).all()
