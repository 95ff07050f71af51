"""Edit quality scores, each checked against an independent computation on fixed inputs.

CLIP against open_clip's own encode_image / encode_text on a tiny CLIP with random weights (built here,
saved as safetensors: the scorer must load exactly those weights); LPIPS against the lpips package loading
the same backbone weights itself (through torchvision and torch hub's cache); PSNR and SSIM against
scikit-image; directional CLIP against its formula.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.stages import scores
from diffedit.stages.scores import (
    CLIP_COLUMNS,
    SCORE_COLUMNS,
    ScoreConfig,
    ScoreLoadError,
    Scorer,
    directional_similarity,
    gaussian_filter,
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
    """An empty torch hub cache of its own for the test (restored afterwards)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


@pytest.fixture
def no_default_clip(tmp_path, monkeypatch):
    monkeypatch.setattr(scores, "SHIPPED_CLIP", tmp_path / "no-such-clip")


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
    monkeypatch.setattr(scores, "SHIPPED_CLIP", tiny_clip_dir)
    scorer = Scorer(ScoreConfig(device="cpu"))
    assert scorer.clip is not None and not set(CLIP_COLUMNS) & set(scorer.unavailable)


# -- LPIPS -----------------------------------------------------------------------------------------------


def test_lpips_matches_the_package_with_the_same_backbone(hub_dir, no_default_clip):
    """The lpips package loads the backbone itself (torchvision, from torch hub's cache); so does the scorer."""
    import lpips
    from safetensors.torch import save_file

    cached = scores.lpips_backbone_cache_file("alex")
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
        assert got["ssim_bg"][i] == pytest.approx(S[~m].mean(), abs=1e-9)
        assert got["ssim_fg"][i] == pytest.approx(S[m].mean(), abs=1e-9)
        assert got["mask_fraction"][i] == pytest.approx(m.mean())
        # Full images: the map itself, and skimage's scalar SSIM (the map's mean without a 5-pixel border).
        ta, tb = (torch.from_numpy(x).permute(2, 0, 1)[None] for x in (a, b))
        ours = ssim_map(ta, tb)[0]
        np.testing.assert_allclose(ours.numpy(), S, rtol=0, atol=1e-9)
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
