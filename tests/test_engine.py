"""The engine on tiny real models: batch invariance, determinism, inputs, loading."""

import shutil
from pathlib import Path
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffedit.stages.config import EditConfig
from diffedit.stages.editor import DiffEditor, edit_batch, load
from diffedit.stages.images import images_to_tensor
from diffedit.stages.model import ModelLoadError, load_model
from diffedit.stages.sources import describe_model
from diffedit.stages.randomness import edit_seed, per_image_noise

FAST = EditConfig.from_flat(steps=10, mask_samples=3)


def random_images(n, size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def edit_padded(model, images, sources, targets, seeds, config, size):
    """edit_batch on the batch padded to ``size`` with copies of its last edit (as a job pads for a compiled UNet's
    static shapes), the padding's results dropped: (mask_Bhw, edited_BCHW)."""
    extra = size - len(seeds)
    pad = lambda values: list(values) + [values[-1]] * extra  # noqa: E731
    out = edit_batch(model, torch.cat([images, images[-1:].expand(extra, -1, -1, -1)]), pad(sources), pad(targets),
                     pad(seeds), config)
    return out.mask_Bhw[: len(seeds)], out.edited_BCHW[: len(seeds)]


def test_batch_invariance(tiny_model, monkeypatch):
    """An image edited among 4 others equals the same image edited alone, mask included.

    Same noise, same mask, bitwise; the pixels agree to float32 rounding only, since batched BLAS and
    conv kernels sum in a batch-size-dependent order (~1e-6 per UNet call), which 10 guided steps at
    7.5 on a random model amplify to ~1e-4 (of a [-1, 1] range: 1/255 is 8e-3, so the saved 8-bit
    images agree to within one level)."""
    m = tiny_model
    images = images_to_tensor(random_images(5), m.resolution)
    sources = ["a red circle", "a dog", "a green star on a white background", "", "a cat"]
    targets = ["a blue circle", "a cat", "a yellow star on a white background", "a square", "a dog"]
    seeds = [edit_seed(0, f"k{i}", 0) for i in range(5)]
    batch = edit_batch(m, images, sources, targets, seeds, FAST)
    alone = edit_batch(m, images[2:3], sources[2:3], targets[2:3], seeds[2:3], FAST)
    assert 0 < batch.mask_Bhw[2].float().mean() < 1
    assert torch.equal(batch.mask_Bhw[2], alone.mask_Bhw[0])
    torch.testing.assert_close(batch.soft_Bhw[2], alone.soft_Bhw[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.latents_BChw[2], alone.latents_BChw[0], rtol=0, atol=5e-4)
    torch.testing.assert_close(batch.edited_BCHW[2], alone.edited_BCHW[0], rtol=0, atol=5e-4)
    # Padding a short batch (static shapes for a compiled UNet) changes nothing for the real images.
    padded_mask, padded_edit = edit_padded(m, images[:3], sources[:3], targets[:3], seeds[:3], FAST, 5)
    assert padded_edit.shape[0] == 3 and torch.equal(padded_mask, batch.mask_Bhw[:3])
    torch.testing.assert_close(padded_edit, batch.edited_BCHW[:3], rtol=0, atol=5e-4)
    # Micro-batching the UNet (the model wrapper's cap) changes nothing either; no UNet call exceeds the cap.
    rows = []
    hook = m.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    monkeypatch.setattr(m, "max_batch", 3)
    try:
        micro = edit_batch(m, images, sources, targets, seeds, FAST)
    finally:
        hook.remove()
    assert max(rows) == 3 and min(rows) == 2  # two prompts per latent in the mask and the decoding: 1 latent a call
    assert torch.equal(micro.mask_Bhw, batch.mask_Bhw)
    torch.testing.assert_close(micro.edited_BCHW, batch.edited_BCHW, rtol=0, atol=5e-4)


def test_determinism_and_per_key_noise(tiny_model):
    editor = DiffEditor(tiny_model, FAST)
    image = random_images(1)[0]
    a = editor.edit([image], "a red circle", "a blue circle", keys=["sample-1"], seed=7)[0]
    b = editor.edit([image], "a red circle", "a blue circle", keys=["sample-1"], seed=7)[0]
    c = editor.edit([image], "a red circle", "a blue circle", keys=["sample-2"], seed=7)[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.soft_map, b.soft_map)
    assert a.seed != c.seed and not np.array_equal(a.soft_map, c.soft_map)
    assert edit_seed(7, "sample-1", 0) != edit_seed(7, "sample-1", 1) != edit_seed(8, "sample-1", 0)
    assert torch.equal(per_image_noise([5], (2, 3)), per_image_noise([5], (2, 3)))


def test_odd_sizes_and_modes_come_back_at_their_own_size(tiny_model):
    editor = DiffEditor(tiny_model, FAST)
    rgb = random_images(1, size=(37, 53))[0]
    gray = rgb.convert("L")
    rgba = rgb.convert("RGBA")
    tall = random_images(1, size=(9, 70))[0]
    results = editor.edit([rgb, gray, rgba, tall], "a red circle", "a blue circle")
    for image, result in zip([rgb, gray, rgba, tall], results):
        assert result.image.size == image.size and result.image.mode == "RGB"
        assert result.mask.size == image.size and result.mask.mode == "L"
        f = tiny_model.vae_scale_factor
        assert result.soft_map.shape == (result.edit_size[1] // f, result.edit_size[0] // f)
        assert 0 <= result.soft_map.min() <= result.soft_map.max() <= 1


def test_user_mask_skips_inference(tiny_model):
    editor = DiffEditor(tiny_model, FAST)
    image = random_images(1, size=(40, 40))[0]
    user = np.zeros((40, 40), dtype=np.uint8)
    user[10:20, 5:30] = 1
    with_mask, without = editor.edit([image, image], "a red circle", "a blue circle", masks=[user, None], keys=["a", "a"])
    assert not with_mask.mask_inferred and without.mask_inferred
    got = np.asarray(with_mask.mask) > 0
    assert got[10:20, 5:30].all()  # every user pixel is editable
    assert got.mean() < 0.5  # and the background mostly is not


def test_empty_and_long_prompts(tiny_model):
    editor = DiffEditor(tiny_model, FAST)
    image = random_images(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        long_prompt = " ".join(["red circle"] * 60)
        result = editor.edit([image, image], ["", long_prompt], ["a blue circle", long_prompt + " blue"])
    assert len(result) == 2
    assert any("truncated" in str(w.message) for w in caught)


def test_mismatched_lengths_are_refused(tiny_model):
    editor = DiffEditor(tiny_model, FAST)
    with pytest.raises(ValueError, match="2 images but 3 source_prompts"):
        editor.edit(random_images(2), ["a", "b", "c"], "x")
    with pytest.raises(ValueError, match="must be equal"):
        edit_batch(tiny_model, images_to_tensor(random_images(2), 32), ["a"], ["b", "c"], [1, 2], FAST)


def test_config_validation():
    with pytest.raises(ValueError, match="encode_ratio"):
        EditConfig.from_flat(encode_ratio=1.5)
    with pytest.raises(ValueError, match="Unknown edit parameter"):
        EditConfig.from_flat(guidence=2.0)
    assert EditConfig.from_flat({"guidance": 3.0}, guidance=None).decode.guidance == 3.0


# -- loading ---------------------------------------------------------------------------------------


def test_load_through_public_api_uses_recommended_defaults(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (folder / "diffedit.json").write_text('{"guidance": 2.5}')
    assert load(folder, device="cpu").config.decode.guidance == 2.5
    assert load(folder, device="cpu", guidance=4.0).config.decode.guidance == 4.0


def test_pickled_only_weights_are_refused(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="only pickled weights"):
        load_model(folder, device="cpu")


def test_incomplete_folder_names_what_is_missing(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    shutil.rmtree(folder / "vae")
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing vae/, text_encoder/model.safetensors"):
        load_model(folder, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere", device="cpu")


def test_unreachable_hub_id_gives_a_clear_error():
    with pytest.raises(ModelLoadError, match="hub id"):
        load_model("no-such-org/no-such-model", device="cpu")
    with pytest.raises(ModelLoadError, match="hub id"):
        describe_model("no-such-org/no-such-model")


def test_describe_model_loads_no_weights(tiny_model_dir, monkeypatch):
    """A folder is described from its configs and file bytes; a hub id from its configs and the hub's own file hashes
    (no weight file is downloaded). Neither loads the model."""
    import huggingface_hub
    from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

    from diffedit.stages import model as model_module

    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("describe_model loaded the model"))
    local = describe_model(tiny_model_dir)
    assert local["resolution"] == 32 and local["source"] == str(tiny_model_dir.resolve()) and len(local["fingerprint"]) == 64

    def hub(weights_sha256):
        weights = BlobLfsInfo(size=1, sha256=weights_sha256, pointer_size=1)
        files = [RepoSibling("unet/diffusion_pytorch_model.safetensors", lfs=weights), RepoSibling("unet/config.json", blob_id="1"),
                 RepoSibling("vae/config.json", blob_id="2"), RepoSibling("README.md", blob_id="3")]
        return SimpleNamespace(sha="0" * 40, siblings=files)

    downloaded = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, name, revision=None: downloaded.append(name) or str(tiny_model_dir / name))
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, files_metadata: hub("a" * 64))
    first = describe_model("some-org/some-model")
    assert first["source"] == "some-org/some-model" and first["resolution"] == 32 and first["recommended"] == {}
    assert sorted(downloaded) == ["model_index.json", "unet/config.json", "vae/config.json"]  # the family, the size
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, files_metadata: hub("b" * 64))
    assert describe_model("some-org/some-model")["fingerprint"] != first["fingerprint"]  # other weights on the hub


def test_max_batch_is_checked_when_loading(tiny_model_dir):
    assert load_model(tiny_model_dir, device="cpu", max_batch=4).max_batch == 4
    with pytest.raises(ValueError, match="`max_batch` must be >= 1 or None but is 0"):
        load_model(tiny_model_dir, device="cpu", max_batch=0)


def test_v_prediction_and_half_precision(tmp_path):
    from diffedit.shapes.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "v", prediction_type="v_prediction")
    model = load_model(folder, device="cpu", dtype="bf16")
    assert model.prediction_type == "v_prediction" and model.unet.dtype == torch.bfloat16
    result = DiffEditor(model, FAST).edit(random_images(1), "a red circle", "a blue circle")[0]
    assert np.isfinite(result.soft_map).all() and result.image.size == (32, 32)
    with pytest.raises(ValueError, match="dtype"):
        load_model(folder, device="cpu", dtype="fp8")


def test_fingerprint_changes_with_weights(tiny_model_dir, tmp_path):
    a = load_model(tiny_model_dir, device="cpu")
    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")
    b = load_model(folder, device="cpu")
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.unet.conv_in.weight[0, 0, 0, 0] += 1
    b._fingerprint = None
    assert a.fingerprint() != b.fingerprint()


def test_compiled_engine_matches_eager(tiny_model_dir):
    """The compiled path (the denoiser, then the VAE too, in place) edits as the eager one does, padded batch included."""
    # max_batch 8 with guided encoding: every UNet call (mask 4 x 3 x 2, encoding, decoding) is one graph of 8.
    eager = load_model(tiny_model_dir, device="cpu", dtype="fp32", max_batch=8)
    compiled = load_model(tiny_model_dir, device="cpu", dtype="fp32", max_batch=8).compile(vae=False)
    assert compiled._compiled == {"denoiser"}
    compiled.compile()
    assert compiled._compiled == {"denoiser", "vae_encoder", "vae_decoder"}
    assert "_orig_mod" not in "".join(compiled.unet.state_dict()) + "".join(compiled.vae.state_dict())  # in place
    images = images_to_tensor(random_images(3), eager.resolution)
    sources, targets = ["a red circle", "a dog", "a star"], ["a blue circle", "a cat", "a square"]
    seeds = [edit_seed(0, f"k{i}", 0) for i in range(3)]
    config = EditConfig.from_flat(steps=10, mask_samples=3, conditional_encoding=True, encode_guidance=3.0)
    ref = edit_batch(eager, images, sources, targets, seeds, config)
    out_mask, out_edit = edit_padded(compiled, images, sources, targets, seeds, config, 4)
    assert torch.equal(out_mask, ref.mask_Bhw)
    torch.testing.assert_close(out_edit, ref.edited_BCHW, rtol=0, atol=1e-3)
    # A batch of 4 rows holding 2 latents x 2 prompts, then 4 latents x 1 prompt: the same shapes reach the UNet, so
    # only a guard on the number of copies keeps the second call off the first one's graph (which shares rows).
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = eager.encode_text(["a", "b", "c", "d"])
    for latents in (x[:2], x):
        torch.testing.assert_close(compiled.predict(latents, 500, embeds), eager.predict(latents, 500, embeds), rtol=0, atol=1e-4)


def test_attention_backend_choice(tiny_model_dir):
    """A chosen SDPA kernel (here the math one, the only one sure to exist on CPU) edits as PyTorch's own choice does."""
    default = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    chosen = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    chosen.attention = "math"
    images = images_to_tensor(random_images(2), default.resolution)
    seeds = [edit_seed(0, f"k{i}", 0) for i in range(2)]
    config = EditConfig.from_flat(steps=6, mask_samples=2)
    ref = edit_batch(default, images, ["a red circle"] * 2, ["a blue circle"] * 2, seeds, config)
    out = edit_batch(chosen, images, ["a red circle"] * 2, ["a blue circle"] * 2, seeds, config)
    torch.testing.assert_close(out.edited_BCHW, ref.edited_BCHW, rtol=0, atol=1e-4)
    chosen.attention = "fast"
    with pytest.raises(ValueError, match="`attention` must be one of flash, cudnn"):
        edit_batch(chosen, images, ["a red circle"] * 2, ["a blue circle"] * 2, seeds, config)


def test_prompt_free_prefix_runs_once_per_latent(tiny_model_dir):
    """With k prompts per latent, the UNet's first ResNet and first self-attention see each latent once; the
    output is the per-row UNet's, and the rows come back as k blocks of B."""
    model = load_model(tiny_model_dir, device="cpu", dtype="fp32")
    resnet, attn1 = model._prefix.modules
    assert resnet is model.unet.down_blocks[0].resnets[0]
    assert attn1 is model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = []
    for module in (resnet.conv1, attn1.to_q, model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q):
        module.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embeds = model.encode_text(["a", "b", "c", "", "", ""])  # k = 2: three prompts, then the empty prompt thrice
    shared = model.predict(x, 500, embeds)
    assert seen == [3, 3, 6]  # ResNet and self-attention once per latent; the cross-attention per row
    seen.clear()
    model.share_prefix = False
    per_row = model.predict(x, 500, embeds)
    assert seen == [6, 6, 6]
    torch.testing.assert_close(shared, per_row, rtol=0, atol=1e-5)
    direct = model.unet(torch.cat([x, x]), torch.full((6,), 500.0), encoder_hidden_states=embeds.embeds).sample
    torch.testing.assert_close(per_row, direct, rtol=0, atol=0)
    # Micro-batches keep a latent's k rows together; the result does not change.
    model.share_prefix = True
    model.max_batch = 3
    torch.testing.assert_close(model.predict(x, 500, embeds), shared, rtol=0, atol=1e-5)
    model.max_batch = 0
    with pytest.raises(ValueError, match="`max_batch` must be >= 1"):
        model.predict(x, 500, embeds)
    model.max_batch = None
    with pytest.raises(ValueError, match="3 latents and 4 prompt embeddings"):
        model.predict(x, 500, embeds[:4])


def test_prefix_sharing_only_where_the_prompt_is_not_seen():
    """A UNet whose first transformer block cross-attends in its first attention, or whose time embedding gets
    text, shares less or nothing."""
    from diffusers import UNet2DConditionModel

    from diffedit.stages.prefix import prompt_free_modules

    kw = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, norm_num_groups=4,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              attention_head_dim=2)
    unet = UNet2DConditionModel(**kw)
    assert len(prompt_free_modules(unet)) == 2
    only_cross = UNet2DConditionModel(**kw, only_cross_attention=True)
    assert prompt_free_modules(only_cross) == [only_cross.down_blocks[0].resnets[0]]
    text_time = UNet2DConditionModel(**kw, addition_embed_type="text", encoder_hid_dim=16)
    assert prompt_free_modules(text_time) == []


@pytest.mark.parametrize("index, named", [
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": [], "text_encoder": [None, None],
      "text_encoder_2": [], "requires_aesthetics_score": True}, "Stable Diffusion XL refiner"),
    ({"_class_name": "SanaPipeline", "transformer": []}, "a transformer-based pipeline"),
    ({"_class_name": "StableDiffusionXLInpaintPipeline", "unet": [], "text_encoder": [], "text_encoder_2": []},
     "an inpainting model"),
    ({"_class_name": "StableDiffusionInpaintPipeline", "unet": [], "text_encoder": []}, "an inpainting model"),
    ({"_class_name": "KandinskyPipeline", "unet": []}, "pipeline class 'KandinskyPipeline'"),
])
def test_a_model_of_another_family_is_refused_naming_the_supported_ones(tmp_path, capsys, index, named):
    """Read from model_index.json before anything else: a folder of another family is refused by the driver in one
    line (not as an error row per sample, nor as 'incomplete: missing unet/')."""
    import json

    from diffedit.pipelines.cli import main
    from diffedit.stages.sources import ModelLoadError, check_model_folder

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="which diffedit does not run; supported: Stable Diffusion 1.x/2.x.*Stable Diffusion XL.*Stable Diffusion 3.x.*FLUX.1") as err:
        check_model_folder(folder)
    assert named in str(err.value)
    shard = Path(__file__).resolve().parents[1] / "samples"
    assert main(["run", str(next(shard.glob("*.tar"))), "--output", str(tmp_path / "out"), "--model", str(folder)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("diffedit run: error:") and named in line


def test_the_shipped_and_tiny_models_are_stable_diffusion(tiny_model_dir):
    import json

    from diffedit.stages.sources import SHIPPED_MODEL, model_family

    for folder in (tiny_model_dir, SHIPPED_MODEL):
        if (folder / "model_index.json").is_file():
            assert model_family(json.loads((folder / "model_index.json").read_text())) == "sd"
