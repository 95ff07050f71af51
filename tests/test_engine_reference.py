"""Our three steps against diffusers' StableDiffusionDiffEditPipeline, the independent reference.

The reference is configured to agree with the paper where it can: same image latents (posterior mean:
we patch its VAE sampling to return the mean), same injected mask noise (we patch its `randn_tensor`),
conditional encoding with guidance 7.5 where we compare with its inversion. Each deliberate difference
has its own test below.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.deprecated.stable_diffusion_diffedit import pipeline_stable_diffusion_diffedit as ref_module
from PIL import Image

from diffedit.stages.config import EditConfig, EncodeConfig, MaskConfig
from diffedit.stages.decode import masked_decode
from diffedit.stages.encode import Trajectory, invert
from diffedit.stages.images import images_to_tensor
from diffedit.stages.mask import infer_mask, normalize_map
from diffedit.stages.randomness import per_image_noise

SOURCE, TARGET = "a red circle on a gray background", "a blue square on a gray background"


@pytest.fixture
def reference(tiny_model, monkeypatch):
    m = tiny_model
    monkeypatch.setattr(vae_module.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    pipe = StableDiffusionDiffEditPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config),
        inverse_scheduler=DDIMInverseScheduler.from_config(m.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=[False, True], ids=["prefix-per-row", "prefix-shared"])
def sharing(tiny_model, request):
    """Our steps with the UNet's prompt-independent first layers run per row, as the reference runs them, and
    once per latent (stages/prefix.py), our default. Shared, those layers run at a smaller batch, whose CPU
    kernels round differently (~1e-6 per UNet call); 40 steps at guidance 7.5 amplify that to ~1e-4."""
    tiny_model.share_prefix = request.param
    yield dict(rtol=0, atol=5e-4) if request.param else None
    tiny_model.share_prefix = True


@pytest.fixture
def image(tiny_model):
    rng = np.random.default_rng(0)
    r = tiny_model.resolution
    return Image.fromarray(rng.integers(0, 256, (r, r, 3), dtype=np.uint8))


def test_mask_matches_reference(tiny_model, reference, image, monkeypatch):
    m = tiny_model
    latents = m.encode_images(images_to_tensor([image], m.resolution))
    noise = per_image_noise([1234], (10, *latents.shape[1:]))
    monkeypatch.setattr(ref_module, "randn_tensor", lambda shape, **kw: noise[0].to(kw.get("dtype")))
    # The reference applies guidance 7.5 to both predictions; ours skips it (it cancels in the rescaling).
    ref_mask = reference.generate_mask(image=image, source_prompt=SOURCE, target_prompt=TARGET,
                                       num_maps_per_mask=10, mask_encode_strength=0.5,
                                       mask_thresholding_ratio=3.0, guidance_scale=7.5, output_type="np")
    embeds = m.encode_text([SOURCE, TARGET])
    ours = infer_mask(m, latents, embeds[:1], embeds[1:], noise, MaskConfig())
    assert 0 < ref_mask.mean() < 1, "a trivial mask would make this comparison meaningless"
    np.testing.assert_array_equal(ours.mask_Bhw.numpy().astype(np.int64), ref_mask.astype(np.int64))


@pytest.mark.parametrize("prompt, guidance", [(SOURCE, 7.5), ("", 1.0)])
def test_encoding_matches_reference_inversion(tiny_model, reference, image, prompt, guidance, sharing):
    m = tiny_model
    ref = reference.invert(prompt=prompt, image=image, num_inference_steps=50, inpaint_strength=0.8,
                           guidance_scale=guidance).latents[0]  # K x C x h x w, most noisy first
    latents = m.encode_images(images_to_tensor([image], m.resolution))
    embeds = m.encode_text([prompt, ""])
    config = EncodeConfig(conditional=bool(prompt), guidance=guidance)
    traj = invert(m, latents, embeds[:1], config, uncond=embeds[1:])
    ours = torch.stack(traj.latents[1:][::-1])[:, 0]
    assert ours.shape == ref.shape == (40, 4, 16, 16)
    torch.testing.assert_close(ours, ref, **(sharing or dict(rtol=1e-5, atol=1e-5)))


def test_decoding_matches_reference(tiny_model, reference, image, sharing):
    m = tiny_model
    ref_inverted = reference.invert(prompt=SOURCE, image=image, num_inference_steps=50, inpaint_strength=0.8,
                                    guidance_scale=7.5).latents.contiguous()  # 1 x K x C x h x w
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[:, 4:11, 3:12] = True
    ref_out = reference(prompt=TARGET, mask_image=mask.float().numpy(), image_latents=ref_inverted,
                        inpaint_strength=0.8, num_inference_steps=50, guidance_scale=7.5,
                        output_type="latent").images
    # The reference pastes ref[i] after decoding step i (one level noisier than the step's output);
    # arranging its latents as a trajectory reproduces that schedule with our decoder.
    K = ref_inverted.shape[1]
    arranged = [ref_inverted[:, K - 1 - j] for j in range(K)] + [ref_inverted[:, 0]]
    # One prompt per text-encoder call and contiguous latents, as the reference has them: a batched
    # encoder or a strided layout changes the last bits, which 40 guided steps amplify to ~1e-5.
    target, negative = m.encode_text([TARGET]), m.encode_text([""])
    ours = masked_decode(m, Trajectory(arranged, None), mask, target, negative, guidance=7.5, num_steps=50)
    torch.testing.assert_close(ours, ref_out, **(sharing or dict(rtol=1e-6, atol=1e-6)))


# -- deliberate differences, each with the effect it is meant to have ---------------------------------


def test_background_is_the_images_own_latent_at_the_end(tiny_model, image):
    """Ours pastes the encoded latent of the level each step reaches, x_0 after the last step, so with an
    empty mask the output is exactly the image's latent (the reference ends on a slightly noisy one)."""
    m = tiny_model
    latents = m.encode_images(images_to_tensor([image], m.resolution))
    embeds = m.encode_text([TARGET, ""])
    traj = invert(m, latents, embeds[1:], EncodeConfig())
    out = masked_decode(m, traj, torch.zeros(1, 16, 16, dtype=torch.bool), embeds[:1], embeds[1:])
    assert torch.equal(out, latents)
    assert not torch.allclose(traj.latents[1], latents, atol=1e-4)  # the reference's last paste differs


def test_unconditional_encoding_ignores_the_source_prompt(tiny_model, image):
    m = tiny_model
    latents = m.encode_images(images_to_tensor([image], m.resolution))
    a, b, empty = m.encode_text([SOURCE, "a green star", ""])
    trajectories = {}
    for name, config in {"uncond": EncodeConfig(), "cond": EncodeConfig(conditional=True)}.items():
        # What the paper's encoding sees is the empty prompt, whatever the source prompt is.
        pa = invert(m, latents, (a if config.conditional else empty)[None], config)
        pb = invert(m, latents, (b if config.conditional else empty)[None], config)
        trajectories[name] = (pa.latents[-1], pb.latents[-1])
    assert torch.equal(*trajectories["uncond"])
    assert not torch.allclose(*trajectories["cond"])


def test_mask_normalisation_is_per_image():
    """diffusers clamps by the batch-wide mean; ours by each image's own mean."""
    rng = torch.Generator().manual_seed(0)
    a = torch.rand(1, 16, 16, generator=rng)
    b = torch.rand(1, 16, 16, generator=rng) * 100  # a batch-mate with a much stronger difference
    alone = normalize_map(a, MaskConfig())
    together = normalize_map(torch.cat([a, b]), MaskConfig())
    assert torch.equal(alone.soft_Bhw[0], together.soft_Bhw[0])
    assert torch.equal(alone.mask_Bhw[0], together.mask_Bhw[0])
    # The batch-wide rule would have changed image a's mask:
    batch_clamp = torch.cat([a, b]).mean() * 3.0
    assert not torch.equal((a.clamp(0, batch_clamp) / batch_clamp > 0.5)[0], alone.mask_Bhw[0])


def test_latents_are_the_posterior_mean(tiny_model, image):
    m = tiny_model
    x = images_to_tensor([image], m.resolution)
    expected = m.vae.encode(x).latent_dist.mean * m.vae.config.scaling_factor
    torch.testing.assert_close(m.encode_images(x), expected)
    assert torch.equal(m.encode_images(x), m.encode_images(x))


def test_default_config_is_the_papers():
    flat = EditConfig().flat()
    assert flat["steps"] == 50 and flat["encode_ratio"] == 0.8 and flat["mask_samples"] == 10
    assert flat["mask_strength"] == 0.5 and flat["threshold"] == 0.5 and flat["guidance"] == 7.5
    assert flat["conditional_encoding"] is False
