"""The model families on tiny real models (SDXL, Stable Diffusion 3 with and without T5, FLUX.1 dev and schnell).

Each tiny model is built here from small configs with random weights, saved in the diffusers layout and loaded
through load_model, the path a real checkpoint takes. What we build is compared with what diffusers' own
pipelines build for the same inputs: the conditioning (encode_prompt), FLUX's latent packing and position ids, and
a whole denoising run (masked decoding with a full mask is img2img: the same schedule, guidance, time inputs and
steps as StableDiffusionXLImg2ImgPipeline, StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffedit.shapes.tiny import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl
from diffedit.stages.config import EditConfig, EncodeConfig
from diffedit.stages.decode import masked_decode
from diffedit.stages.editor import edit_batch
from diffedit.stages.encode import invert, noise_encode
from diffedit.stages.families import latent_ids, pack_latents, unpack_latents
from diffedit.stages.model import load_model
from diffedit.stages.randomness import edit_seed

# Text encoders run on a batch of every distinct prompt at once, the pipelines' on the prompts, then the negative
# prompt alone: a different batch changes the last float32 bits of T5 (never CLIP's here), so within 1e-5.
TEXT = dict(rtol=1e-5, atol=1e-5)

BUILDERS = {
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "sd3-no-t5": lambda out: build_tiny_sd3(out, t5=False),
    "flux-dev": build_tiny_flux,
    "flux-schnell": lambda out: build_tiny_flux(out, guidance_embeds=False),
}
IMG2IMG = {"sdxl": "StableDiffusionXLImg2ImgPipeline", "sd3": "StableDiffusion3Img2ImgPipeline",
           "sd3-no-t5": "StableDiffusion3Img2ImgPipeline", "flux-dev": "FluxImg2ImgPipeline",
           "flux-schnell": "FluxImg2ImgPipeline"}
PROMPTS = ["a red circle on a blue background", "a photo of a dog"]
SIZE = 32  # pixels; 16 x 16 latents


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def models(folders):
    return {name: load_model(folder, device="cpu", dtype="fp32") for name, folder in folders.items()}


def pipeline(folders, name):
    import diffusers

    left_out = dict(text_encoder_3=None, tokenizer_3=None) if name == "sd3-no-t5" else {}
    return getattr(diffusers, IMG2IMG[name]).from_pretrained(folders[name], **left_out)


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_each_family_is_read_from_model_index_and_loads_its_parts(folders, models):
    expected = {"sdxl": ("sdxl", "unet", "epsilon"), "sd3": ("sd3", "transformer", "flow"),
                "sd3-no-t5": ("sd3", "transformer", "flow"), "flux-dev": ("flux", "transformer", "flow"),
                "flux-schnell": ("flux", "transformer", "flow")}
    for name, (family, denoiser, prediction) in expected.items():
        m = models[name]
        assert (m.family.name, m.prediction_type) == (family, prediction)
        assert m.denoiser is m.parts[denoiser]
    assert "text_encoder_3" in models["sd3"].parts and "text_encoder_3" not in models["sd3-no-t5"].parts
    assert json.loads((folders["sd3-no-t5"] / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    # Edit defaults from the family (FLUX.1 schnell: 4 steps, no guidance, as its pipeline).
    assert models["sdxl"].recommended == {"guidance": 5.0}
    assert models["sd3"].recommended == {"steps": 28, "guidance": 7.0}
    assert models["flux-dev"].recommended == {"steps": 28, "guidance": 3.5}
    assert models["flux-schnell"].recommended == {"steps": 4, "guidance": 1.0}


# -- the conditioning, against the pipelines' own helpers -----------------------------------------------------


def test_sdxl_conditioning_equals_the_pipelines(folders, models):
    pipe = pipeline(folders, "sdxl")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                   do_classifier_free_guidance=True)
    ours = models["sdxl"].encode_text(PROMPTS + [""])
    torch.testing.assert_close(ours.embeds[:2], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.parts["pooled"][:2], pooled, rtol=0, atol=0)
    # force_zeros_for_empty_prompt: the unconditional rows are zeros, in the pipeline and in ours.
    assert not negative.any() and not negative_pooled.any()
    torch.testing.assert_close(ours.embeds[2:], negative[:1], rtol=0, atol=0)
    torch.testing.assert_close(ours.parts["pooled"][2:], negative_pooled[:1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sd3", "sd3-no-t5"])
def test_sd3_conditioning_equals_the_pipelines(folders, models, name):
    pipe = pipeline(folders, name)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    ours = models[name].encode_text(PROMPTS + [""])
    assert ours.embeds.shape == (3, 77 + 256, 32)
    torch.testing.assert_close(ours.embeds[:2], embeds, **TEXT)
    torch.testing.assert_close(ours.parts["pooled"][:2], pooled, rtol=0, atol=0)
    torch.testing.assert_close(ours.embeds[2:], negative[:1], **TEXT)
    torch.testing.assert_close(ours.parts["pooled"][2:], negative_pooled[:1], rtol=0, atol=0)
    if name == "sd3-no-t5":
        assert not ours.embeds[:, 77:].any()  # zeros where the T5 encoder was left out, as the pipeline's


def test_flux_conditioning_packing_and_ids_equal_the_pipelines(folders, models):
    pipe = pipeline(folders, "flux-dev")
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", num_images_per_prompt=1)
    ours = models["flux-dev"].encode_text(PROMPTS)
    torch.testing.assert_close(ours.embeds, embeds, **TEXT)
    torch.testing.assert_close(ours.parts["pooled"], pooled, rtol=0, atol=0)
    assert text_ids.shape == (512, 3) and not text_ids.any()  # ours: zeros of the same shape (Flux.forward)
    x = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(x, 2, 4, 16, 12)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, 16, 12), pipe._unpack_latents(packed, 32, 24, pipe.vae_scale_factor))
    assert torch.equal(unpack_latents(pack_latents(x), 16, 12), x)
    assert torch.equal(latent_ids(8, 6, "cpu", torch.float32), pipe._prepare_latent_image_ids(2, 8, 6, "cpu", torch.float32))


# -- a whole denoising run: masked decoding with a full mask is the family's img2img pipeline --------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_mask_decoding_is_the_img2img_pipeline(folders, models, name):
    """The same start (x_0 noised to the level strength 0.8 reaches), timesteps or sigmas, time inputs, guidance
    (classifier-free, or FLUX.1-dev's embedded) and steps: the same latents as the pipeline's output_type="latent"."""
    m, pipe = models[name], pipeline(folders, name)
    steps, guidance = 10, {"flux-schnell": 1.0, "flux-dev": 3.5}.get(name, 5.0)
    x0 = m.encode_images(images(2))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    kwargs = dict(image=x0, strength=0.8, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                  generator=torch.Generator().manual_seed(7))
    if name != "sdxl":
        kwargs.update(height=SIZE, width=SIZE)
    theirs = pipe(prompt=PROMPTS, **kwargs).images
    if theirs.ndim == 3:  # FLUX returns its packed tokens
        theirs = unpack_latents(theirs, *x0.shape[-2:])
    trajectory = noise_encode(m, x0, noise, EncodeConfig(num_steps=steps, encode_ratio=0.8))
    text = m.encode_text(PROMPTS + [""])
    ours = masked_decode(m, trajectory, torch.ones(2, 16, 16, dtype=torch.bool), text[:2], text[2:].expand(2),
                         guidance=guidance, num_steps=steps)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- the engine's guarantees, per family ----------------------------------------------------------------------


SOURCES, TARGETS = ["a red circle", "a green square", "a blue star"], ["a blue circle", "a green star", "a red star"]


def edit(m, n, seed=0, targets=TARGETS, **flat):
    config = EditConfig.from_flat(dict(steps=8, mask_samples=2, **flat))
    seeds = [edit_seed(seed, f"k{i}", 0) for i in range(n)]
    return edit_batch(m, images(n, seed), SOURCES[:n], targets[:n], seeds, config)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_batch_invariant_and_deterministic(models, name):
    """The same call twice: bitwise the same. Each image alone as in a batch of three: the same noise, soft maps
    within float32 rounding (batched kernels sum in another order), so the same mask wherever the map is not within
    that rounding of the threshold, and then the same edit within 5e-4 (as for Stable Diffusion: tests/test_engine.py)."""
    m = models[name]
    batch = edit(m, 3)
    again = edit(m, 3)
    assert torch.equal(batch.edited_BCHW, again.edited_BCHW) and torch.equal(batch.mask_Bhw, again.mask_Bhw)
    config = EditConfig.from_flat(dict(steps=8, mask_samples=2))
    for i in range(3):
        alone = edit_batch(m, images(3)[i : i + 1], [SOURCES[i]], [TARGETS[i]], [edit_seed(0, f"k{i}", 0)], config)
        torch.testing.assert_close(alone.soft_Bhw[0], batch.soft_Bhw[i], rtol=0, atol=1e-4)
        decided = (batch.soft_Bhw[i] - config.mask.threshold).abs() > 1e-4
        assert torch.equal(alone.mask_Bhw[0][decided], batch.mask_Bhw[i][decided])
        if torch.equal(alone.mask_Bhw[0], batch.mask_Bhw[i]):
            torch.testing.assert_close(alone.edited_BCHW[0], batch.edited_BCHW[i], rtol=0, atol=5e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_outside_the_mask_the_latents_are_the_sources(models, name):
    """An identity edit (target = source) and a real one: outside the mask, the edited latents are the image's
    own, exactly (the last paste is x_0)."""
    m = models[name]
    x0 = m.encode_images(images(3))
    for targets in (SOURCES, TARGETS):
        out = edit(m, 3, targets=targets, threshold=0.3)
        keep = ~out.mask_Bhw[:, None].expand_as(x0)
        assert keep.any()
        assert torch.equal(out.latents_BChw[keep], x0[keep])
        if targets is SOURCES:  # the identity edit: no difference between the prompts, so no mask at all
            assert not out.mask_Bhw.any() and torch.equal(out.latents_BChw, x0)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_encoding_then_decoding_reconstructs_better_with_more_steps(models, name):
    """Invert under the empty prompt, decode under it with no guidance and a full mask: the round trip returns to
    x_0 up to the integrator's error, which shrinks as the steps do."""
    m = models[name]
    x0 = m.encode_images(images(2))
    empty = m.encode_text(["", ""])
    errors = []
    for steps in (10, 40, 160):  # ratio 0.5: DDIM inversion on a random UNet strays far at high noise
        config = EncodeConfig(num_steps=steps, encode_ratio=0.5)
        trajectory = invert(m, x0, empty, config)
        out = masked_decode(m, trajectory, torch.ones(2, 16, 16, dtype=torch.bool), empty, empty, guidance=1.0,
                            num_steps=steps)
        errors.append(float((out - x0).abs().mean() / x0.abs().mean()))
    assert errors[2] < errors[1] < errors[0], errors
    assert errors[2] < 0.6 * errors[0], errors


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_flow_mask_contrasts_velocities_at_the_strength(models, name):
    """The flow mask: x_s on the straight path at s = the strength, |v_target - v_source| averaged; two different
    prompts give a non-empty map, and the map does not depend on the prompts' order."""
    from diffedit.stages.mask import infer_mask
    from diffedit.stages.config import MaskConfig
    from diffedit.stages.randomness import per_image_noise

    m = models[name]
    x0 = m.encode_images(images(2))
    text = m.encode_text(["a red circle", "a blue square"])
    noise = per_image_noise([1, 2], (3, *x0.shape[1:]))
    a = infer_mask(m, x0, text[[0, 0]], text[[1, 1]], noise, MaskConfig(), num_steps=10, guidance=3.5)
    b = infer_mask(m, x0, text[[1, 1]], text[[0, 0]], noise, MaskConfig(), num_steps=10, guidance=3.5)
    assert a.soft_Bhw.max() > 0 and torch.equal(a.mask_Bhw, b.mask_Bhw)
    schedule = m.schedule(10, 1, (16, 16))
    assert float(schedule.mask_level(0.5)) == pytest.approx(float(schedule.sigmas[5]))


def test_a_refiner_or_another_pipeline_is_refused_naming_the_supported_families(tmp_path):
    from diffedit.stages.sources import ModelLoadError, check_model_folder

    for index, named in [({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
                           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "unet": [],
                           "requires_aesthetics_score": True}, "refiner"),
                          ({"_class_name": "SanaPipeline", "transformer": []}, "transformer-based")]:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ModelLoadError, match=f"{named}.*supported: Stable Diffusion 1.x/2.x.*FLUX.1"):
            check_model_folder(tmp_path)


# -- the whole job, per family -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sd3-no-t5", "flux-dev"])
def test_the_job_runs_and_resumes_on_each_family(folders, tmp_path, name):
    import pandas as pd

    from diffedit.pipelines.config import JobConfig
    from diffedit.pipelines.job import run_job

    shards = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "samples").glob("*.tar"))
    out = tmp_path / "out"

    def run(limit):
        config = JobConfig.from_flat(shards, str(out), model=str(folders[name]), device="cpu", resolution="32",
                                     steps=4, mask_samples=2, limit=limit, scores=False, batch_size=4)
        return run_job(config, log=lambda *a: None)

    def rows():
        return pd.concat([pd.read_parquet(p) for p in sorted((out / "manifest").glob("part-*.parquet"))])

    first = run(2)
    assert first["new_by_status"].get("ok", 0) >= 2 and set(first["new_by_status"]) <= {"ok", "skipped"}, first
    assert json.loads((out / "run.json").read_text())["model_family"] == name.split("-")[0]
    before = rows()
    again = run(2)  # the same job again: nothing left to do
    assert again["new_rows"] == 0 and again["total_by_status"] == first["new_by_status"], again
    more = run(4)  # more samples: new rows only, the first ones untouched
    after = rows()
    assert more["new_rows"] > 0 and len(after) == len(before) + more["new_rows"] and after.edit_id.is_unique
    kept = after.set_index("edit_id").loc[before.edit_id]
    assert (kept.seed.values == before.seed.values).all() and (kept.status.values == before.status.values).all()
    ok = after[after.status == "ok"]
    assert len(ok) >= 4 and {tuple(s) for s in ok[["edit_width", "edit_height"]].values} == {(32, 32)}


# -- per-family options and what the driver reads from the files -----------------------------------------------


@pytest.mark.parametrize("name", ["sd3", "flux-dev"])
def test_shift_replaces_the_schedules_own(models, name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    m = models[name]
    own, shifted = m.schedule(10, 8, (16, 16)), m.schedule(10, 8, (16, 16), shift=1.0)
    reference = FlowMatchEulerDiscreteScheduler.from_config(m.scheduler_config, shift=1.0, use_dynamic_shifting=False)
    sigmas = np.linspace(1.0, 0.1, 10) if name == "flux-dev" else None
    reference.set_timesteps(10, sigmas=sigmas)
    torch.testing.assert_close(shifted.sigmas, reference.sigmas.float(), rtol=0, atol=0)
    assert not torch.allclose(own.sigmas, shifted.sigmas)
    shifted_edit, own_edit = edit(m, 2, shift=1.0, threshold=0.0), edit(m, 2, threshold=0.0)
    assert own_edit.mask_Bhw.any() and not torch.equal(shifted_edit.latents_BChw, own_edit.latents_BChw)


def test_shift_is_refused_for_a_diffusion_model(folders, models, tmp_path, capsys):
    from diffedit.pipelines.cli import main

    with pytest.raises(ValueError, match="`shift` applies to the rectified-flow families"):
        models["sdxl"].schedule(10, 8, (16, 16), shift=3.0)
    shard = next((Path(__file__).resolve().parents[1] / "samples").glob("*.tar"))
    code = main(["run", str(shard), "--output", str(tmp_path / "out"), "--model", str(folders["sdxl"]), "--shift", "2"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "--shift applies to the rectified-flow families (sd3, flux); this model is sdxl" in line
    assert not (tmp_path / "out" / "manifest").exists() or not any((tmp_path / "out" / "manifest").iterdir())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_driver_describes_a_model_from_its_files(folders, models, name):
    """Family, defaults, geometry and fingerprint from the configs and the files' hashes: no weights loaded."""
    from diffedit.stages.sources import describe_model

    probe = describe_model(str(folders[name]))
    m = models[name]
    assert probe["family"] == m.family.name and probe["recommended"] == m.recommended
    assert (probe["resolution"], probe["size_multiple"]) == (m.resolution, m.size_multiple)
    assert len(probe["fingerprint"]) == 64


def test_sdxl_in_fp16_keeps_its_vae_in_fp32(folders):
    """SDXL's VAE overflows in fp16; as diffusers' pipelines do (force_upcast), it runs in fp32."""
    m = load_model(folders["sdxl"], device="cpu", dtype="fp16")
    assert m.vae.dtype == torch.float32 and m.denoiser.dtype == torch.float16 and m.dtype == torch.float16
    latents = m.encode_images(images(1))
    assert latents.dtype == torch.float16 and m.decode_latents(latents).dtype == torch.float32
