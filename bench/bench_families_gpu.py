"""GPU throughput of DiffEdit on SDXL and FLUX.1-dev at 1024 x 1024: our engine against diffusers' pipelines.

No pretrained weights exist here, but a diffusion model's work does not depend on its weight values: this builds
each family's real architecture from its public configs (written below) with random weights, directly on the GPU,
and times, in one process:

``--family sdxl`` (fp16; the SDXL VAE in fp32, as our loader and diffusers' ``force_upcast`` run it)
  (a) our engine, ``edit_batch`` at the paper's defaults (50 steps, encode ratio 0.8, 10 mask samples) with
      SDXL's guidance 5.0, on B images per call (``--batch``, default 1,8);
  (b) ``StableDiffusionXLImg2ImgPipeline``, strength 0.8, 50 steps, guidance 5.0, ``--img2img-batch`` images per
      call (default 8): a plain edit of the whole image, the cheapest thing an editor can do;
  (c) ``LEditsPPPipelineStableDiffusionXL`` as documented: ``invert(image, num_inversion_steps=50, skip=0.2)``,
      then ``pipe(editing_prompt=[source, target], reverse_editing_direction=[True, False], ...)``, one image per
      call (it edits one at a time).
``--family flux`` (bf16; FLUX.1-dev, guidance embedded)
  (a) our engine, 28 steps (the family's default), encode ratio 0.8, 10 mask samples, guidance 3.5;
  (b) ``FluxImg2ImgPipeline``, strength 0.8, 28 steps, guidance 3.5, ``--img2img-batch`` images per call (default 4).

For each: seconds per call, edits (images) per second, denoiser evaluations per edit and per second (rows, i.e.
batch entries, through the UNet or transformer, counted by wrapping its forward; ours: the family's denoiser
call), FLOPs per edit (torch.utils.flop_counter on the warm-up call, over its images; with ``--compile``, on one
eager edit before compiling), share of the FLOP floor (FLOPs over the measured matmul rate at the family's dtype,
over the measured seconds per edit), peak GPU memory (reset per variant; ours is bounded by ``--max-batch``, the
denoiser's rows per call, default 16), and whether the outputs were finite (random weights can overflow; that
does not change the timing).
The pipelines share our components object by object (``Pipeline(**components)``): no weight is held twice. The
setup line gives each component's resident weight memory (GiB). Ours: 1 warm-up call, then the median of 2;
the pipelines: 1 warm-up, 1 timed call. Progress is printed as it goes and the JSON is rewritten after each
variant, so a run cut short keeps what it measured.

On one H200, four commands, each meant to stay under 10 minutes (estimates, not yet measured: about 4, 6, 3 and
7 minutes). ``--append`` keeps the rows of the family's earlier result file that the command does not redo;
``--compile`` times our engine compiled (``model.compile()``) instead of eager, after the baselines (which share
its denoiser and must run eager), with the first call's extra time reported as compile seconds. If the last
command comes near the limit, ``--batch 4`` halves it.

    bash bench/on_gpu.sh python3 bench/bench_families_gpu.py --family sdxl
    bash bench/on_gpu.sh python3 bench/bench_families_gpu.py --family sdxl --compile --batch 8 --skip-img2img --skip-ledits --append
    bash bench/on_gpu.sh python3 bench/bench_families_gpu.py --family flux --batch 1
    bash bench/on_gpu.sh python3 bench/bench_families_gpu.py --family flux --batch 8 --skip-img2img --append

On the CPU: ``--tiny`` runs the same code on shapes/tiny.py's tiny SDXL and FLUX (32 px, 5 steps) in seconds
(add ``--out DIR`` to keep a smoke run's files out of bench/results); ``--dry-build`` builds the real configs on
the meta device and prints parameter counts and weight memory:

    python bench/bench_families_gpu.py --family sdxl --tiny --device cpu
    python bench/bench_families_gpu.py --family flux --tiny --device cpu
    python bench/bench_families_gpu.py --family sdxl --dry-build
    python bench/bench_families_gpu.py --family flux --dry-build

Writes families_<family>_<device>.json and .md under --out (default bench/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image

from bench_gpu import count_flops, matmul_rate, run_ours
from harness import SOURCE, TARGET, add_out_argument, environment, result_path, timed, write_result

from diffedit.stages.config import EditConfig
from diffedit.stages.families import FAMILY_CODE
from diffedit.stages.images import images_to_tensor
from diffedit.stages.model import DiffEditModel, load_model, resolve_device
from diffedit.stages.sources import FAMILIES, family_defaults

# -- the real configs (the public config.json files of each component) -----------------------------------------

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
            sample_size=1024, force_upcast=True)
SDXL_VAE = dict(_VAE, latent_channels=4, scaling_factor=0.13025)
FLUX_VAE = dict(_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                use_post_quant_conv=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")  # CLIP ViT-L/14's text tower
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")  # OpenCLIP bigG
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)  # google/t5-v1_1-xxl, the encoder FLUX.1 uses
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # black-forest-labs/FLUX.1-dev transformer/config.json
SDXL_SCHEDULER = dict(  # the hub's (EulerDiscreteScheduler); our engine runs DDIM from the same config
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    clip_sample=False, set_alpha_to_one=False, interpolation_type="linear", use_karras_sigmas=False)
FLUX_SCHEDULER = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
                      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
FAMILY = {  # dtype on the GPU, img2img images per call, model_index.json
    "sdxl": dict(dtype=torch.float16, img2img_batch=8,
                 index={"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True}),
    "flux": dict(dtype=torch.bfloat16, img2img_batch=4, index={"_class_name": "FluxPipeline"}),
}
EXPECTED_PARAMS = {"sdxl": {"unet": 2.57e9}, "flux": {"transformer": 11.9e9, "text_encoder_2": 4.76e9}}
TINY_SIZE, TINY_STEPS, STRENGTH = 32, 5, 0.8
OURS_REPEATS, BASELINE_REPEATS = 2, 1  # after 1 warm-up call each


# -- building the models --------------------------------------------------------------------------------------


@torch.no_grad()
def random_init_(module: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Small random weights (normal, std 0.02), zero biases, unit norm scales: activations stay in fp16's range."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # the 1-D weights are norm scales
    return module


def build(make, device, dtype) -> torch.nn.Module:
    """``make()`` built directly on ``device`` ("meta": shapes only), randomly initialised there, in ``dtype``, frozen."""
    with torch.device(device):
        module = make()
    random_init_(module)
    module = module.to(dtype).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # the fp32 copy it was built in
    return module


def tokenizers(workdir: Path, t5: bool):
    """(CLIP tokenizer, T5 tokenizer or None): shapes/tiny.py's tokenizers over the benchmark's words (no downloads)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from diffedit.shapes.tiny import write_clip_tokenizer, write_t5_tokenizer

    words = (SOURCE + " " + TARGET).split()
    clip = CLIPTokenizer.from_pretrained(write_clip_tokenizer(workdir / "clip", words, model_max_length=77))
    return clip, (T5TokenizerFast.from_pretrained(write_t5_tokenizer(workdir / "t5", words)) if t5 else None)


def clip_config(tokenizer, **config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def real_sdxl(device, dtype, workdir: Path) -> dict:
    """SDXL base 1.0's parts, random weights; its VAE in fp32 under fp16 (force_upcast), as our loader does."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok, _ = tokenizers(workdir, t5=False)
    vae_dtype = torch.float32 if dtype == torch.float16 and SDXL_VAE["force_upcast"] else dtype
    return dict(unet=build(lambda: UNet2DConditionModel(**SDXL_UNET), device, dtype),
                vae=build(lambda: AutoencoderKL(**SDXL_VAE), device, vae_dtype),
                text_encoder=build(lambda: CLIPTextModel(clip_config(tok, **CLIP_L)), device, dtype),
                text_encoder_2=build(lambda: CLIPTextModelWithProjection(clip_config(tok, **CLIP_BIGG)), device, dtype),
                tokenizer=tok, tokenizer_2=tok)


def real_flux(device, dtype, workdir: Path) -> dict:
    """FLUX.1-dev's parts, random weights."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip, t5 = tokenizers(workdir, t5=True)
    return dict(transformer=build(lambda: FluxTransformer2DModel(**FLUX_DEV), device, dtype),
                vae=build(lambda: AutoencoderKL(**FLUX_VAE), device, dtype),
                text_encoder=build(lambda: CLIPTextModel(clip_config(clip, **CLIP_L)), device, dtype),
                text_encoder_2=build(lambda: T5EncoderModel(T5Config(**T5_XXL)), device, dtype),
                tokenizer=clip, tokenizer_2=t5)


REAL = {"sdxl": (real_sdxl, SDXL_SCHEDULER), "flux": (real_flux, FLUX_SCHEDULER)}


def make_model(family: str, tiny: bool, device, dtype, workdir: Path, max_batch: int | None) -> DiffEditModel:
    """Our DiffEditModel: the tiny model saved and loaded like a checkpoint, or the real parts built in memory."""
    if tiny:
        from diffedit.shapes.tiny import build_tiny_flux, build_tiny_sdxl

        folder = {"sdxl": build_tiny_sdxl, "flux": build_tiny_flux}[family](workdir / family)
        return load_model(folder, device=device, dtype=dtype, max_batch=max_batch)
    make_parts, scheduler = REAL[family]
    parts = make_parts(device, dtype, workdir)
    denoiser = parts[FAMILIES[family].denoiser]
    return DiffEditModel(FAMILY_CODE[family], parts, dict(FAMILY[family]["index"]), dict(scheduler),
                         source="random weights (real config)", device=torch.device(device), dtype=dtype,
                         recommended=family_defaults(family, dict(denoiser.config)), max_batch=max_batch)


def modules(model: DiffEditModel) -> dict:
    return {k: v for k, v in model.parts.items() if isinstance(v, torch.nn.Module)}


def weights_gib(model: DiffEditModel) -> dict:
    """Resident weight memory of each component (parameters and buffers), GiB."""
    return {k: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers())) / 2**30
            for k, m in modules(model).items()}


def dry_build(args) -> int:
    """Build the real configs on the meta device; print parameter counts and weight memory; run nothing."""
    workdir = Path(tempfile.mkdtemp(prefix="bench_families-"))
    model = make_model(args.family, False, "meta", FAMILY[args.family]["dtype"], workdir, args.max_batch)
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules(model).items()}
    for name, n in counts.items():
        expected = EXPECTED_PARAMS[args.family].get(name)
        print(f"{args.family} {name}: {n / 1e9:.3f} B parameters, {weights_gib(model)[name]:.2f} GiB"
              + (f" (expected ~{expected / 1e9:.2f} B)" if expected else ""), flush=True)
    print(f"{args.family}: {sum(counts.values()) / 1e9:.3f} B parameters in all, {sum(weights_gib(model).values()):.2f} "
          f"GiB; edit size {model.resolution} px (multiple of {model.size_multiple})", flush=True)
    return 0


# -- counting the denoiser's rows -------------------------------------------------------------------------------


class RowCounter:
    """Rows (batch entries) through the denoiser, and its calls, while :meth:`attach` holds."""

    def __init__(self):
        self.rows, self.calls = 0, 0

    @contextlib.contextmanager
    def attach(self, owner, rows_of):
        """Wrap ``owner.forward`` (an instance attribute shadows the class's method; removed after)."""
        inner = owner.forward

        def counted(*args, **kwargs):
            self.rows += rows_of(args, kwargs)
            self.calls += 1
            return inner(*args, **kwargs)

        owner.forward = counted
        try:
            yield self
        finally:
            del owner.forward


def module_rows(args, kwargs) -> int:
    """The batch of a UNet (``sample``) or transformer (``hidden_states``) call."""
    return (args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))).shape[0]


def family_rows(args, kwargs) -> int:
    """The batch of a ``Family.forward(model, x_RChw, t_R, text, guidance)`` call."""
    return args[1].shape[0]


def denoiser_counter(model: DiffEditModel, ours: bool):
    """Count rows through the denoiser. Ours: at the family's denoiser call, outside the (possibly compiled) module,
    where a Python counter cannot upset torch.compile; the pipelines: the module's own forward. Same rows."""
    counter = RowCounter()
    if ours:
        return counter, counter.attach(model.family, family_rows)
    return counter, counter.attach(model.denoiser, module_rows)


# -- the baselines --------------------------------------------------------------------------------------------


def shared_parts(model: DiffEditModel) -> dict:
    """Our components, the very objects (a pipeline's constructor takes them by their folder names)."""
    return dict(model.parts)


def sdxl_img2img(model: DiffEditModel):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(**shared_parts(model), add_watermarker=False,
                                            scheduler=EulerDiscreteScheduler.from_config(model.scheduler_config))


def sdxl_ledits(model: DiffEditModel):
    """LEDITS++ with the scheduler its from_pretrained ends up with (it swaps SDXL's Euler for this one)."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusionXL

    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler_config, algorithm_type="sde-dpmsolver++",
                                                        solver_order=2)
    return LEditsPPPipelineStableDiffusionXL(**shared_parts(model), scheduler=scheduler, add_watermarker=False)


def flux_img2img(model: DiffEditModel):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    return FluxImg2ImgPipeline(**shared_parts(model),
                               scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config))


def run_img2img(pipe, images: list, steps: int, guidance: float, **size):
    """An img2img edit of each image under the target prompt. ``size``: FLUX's pipeline resizes to its default
    1024 px (128 latents x its VAE's factor) unless told the height and width; SDXL's keeps the image's size."""
    return pipe(prompt=[TARGET] * len(images), image=images, strength=STRENGTH, num_inference_steps=steps,
                guidance_scale=guidance, output_type="pt", **size).images


def run_ledits(pipe, images: list, steps: int):
    """LEDITS++'s documented usage on one image: invert, then edit (remove the source concept, add the target)."""
    pipe.invert(image=images[0], num_inversion_steps=steps, skip=0.2)
    # diffusers 0.42's invert() leaves an fp16 pipeline's force_upcast VAE in fp32 (its reconstruction decode), and
    # __call__ then decodes fp16 latents with it: a dtype error. Back to the UNet's dtype, as after its encode.
    pipe.vae.to(pipe.unet.dtype)
    return pipe(editing_prompt=[SOURCE, TARGET], reverse_editing_direction=[True, False],
                edit_guidance_scale=[5.0, 10.0], edit_threshold=[0.9, 0.85], output_type="pt").images


@contextlib.contextmanager
def baseline_state(model: DiffEditModel):
    """The shared parts as diffusers' pipelines expect them: all in the model's dtype (they upcast an SDXL VAE
    themselves, per call). Restored after, with the denoiser's attention processors (LEDITS++ swaps them)."""
    vae_dtype, processors = model.vae.dtype, dict(model.denoiser.attn_processors)
    model.vae.to(model.dtype)
    try:
        yield
    finally:
        model.vae.to(vae_dtype)
        model.denoiser.set_attn_processor(processors)


# -- timing and recording -------------------------------------------------------------------------------------


def measure(fn, device, counter: RowCounter, attach, repeats: int, flops: bool) -> tuple:
    """(Timing, FLOPs of the warm-up call or None, denoiser rows per call) of 1 warm-up call and ``repeats`` more."""
    state = {"calls": 0, "flops": None}

    def call():
        state["calls"] += 1
        if state["calls"] == 1 and flops:
            state["flops"] = count_flops(fn)
            return None
        return fn()

    with attach:
        timing = timed(call, device, warmup=1, repeats=repeats)
    return timing, state["flops"], counter.rows / state["calls"]


def finite(out) -> bool | None:
    return bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else None


class Bench:
    """One run: the model, its inputs, the rows measured (and kept from an earlier run with ``--append``)."""

    def __init__(self, args, device, model: DiffEditModel, setup: dict):
        self.args, self.device, self.model, self.setup = args, device, model, setup
        self.size = setup["size"]
        rng = np.random.default_rng(0)
        n = max(max(setup["batches"]), setup["img2img_batch"])
        self.images = [Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)) for _ in range(n)]
        self.x = images_to_tensor(self.images, self.size).to(device, model.dtype)
        self.path = result_path(f"families_{args.family}", args.out, device)
        self.rows, self.kept = [], self._earlier_rows() if args.append else []
        self.flops_per_edit = None  # ours: from the first eager call (or one eager edit before compiling)

    def _earlier_rows(self) -> list:
        try:
            return json.loads(self.path.read_text()).get("rows", [])
        except (OSError, ValueError):
            return []

    def record(self, variant: str, n: int, timing, flops_per_edit, rows_per_call: float, ours: bool = False,
               compiled: bool = False):
        rate, eps = self.setup["matmul_tflops"], n / timing.steady_s
        row = dict(variant=variant, images_per_call=n, max_batch=self.model.max_batch if ours else None,
                   seconds=timing.steady_s, edits_per_s=eps,
                   first_call_s=timing.first_s, tflop_per_edit=flops_per_edit / 1e12 if flops_per_edit else None,
                   floor_share=flops_per_edit / (rate * 1e12) * eps if flops_per_edit and rate else None,
                   denoiser_evals_per_edit=rows_per_call / n, denoiser_evals_per_s=rows_per_call / timing.steady_s,
                   peak_gib=timing.peak_gib, finite=finite(timing.result),
                   compile_s=timing.first_s - timing.steady_s if compiled else None)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write(echo=False)

    def write(self, echo: bool = True):
        ours = {(r["variant"], r["images_per_call"]) for r in self.rows}
        rows = [r for r in self.kept if (r["variant"], r["images_per_call"]) not in ours] + self.rows
        write_result(self.path, self.device, **self.setup, rows=rows)
        write_table(result_path(f"families_{self.args.family}", self.args.out, self.device, suffix=".md"),
                    self.device, self.setup, rows, echo)

    def ours(self, n: int, compiled: bool = False):
        config, model = EditConfig.from_flat(self.setup["edit_config"]), self.model
        if self.flops_per_edit is None and compiled:  # FLOPs counted eagerly, on one edit, before compiling
            self.flops_per_edit = count_flops(lambda: run_ours(model, self.x[:1], config))
        counter, attach = denoiser_counter(model, ours=True)
        fn = lambda: run_ours(model, self.x[:n], config)  # noqa: E731
        timing, flops, rows = measure(fn, self.device, counter, attach, OURS_REPEATS, self.flops_per_edit is None)
        self.flops_per_edit = self.flops_per_edit or flops / n
        name = "ours: DiffEdit (mask, encode, masked decode)" + (", compiled" if compiled else "")
        self.record(name, n, timing, self.flops_per_edit, rows, ours=True, compiled=compiled)

    def baseline(self, name: str, pipe, fn, n: int):
        pipe.set_progress_bar_config(disable=True)
        counter, attach = denoiser_counter(self.model, ours=False)
        with baseline_state(self.model):
            timing, flops, rows = measure(fn, self.device, counter, attach, BASELINE_REPEATS, True)
        self.record(name, n, timing, flops / n, rows)


def run_baselines(bench: Bench, args):
    """diffusers' pipelines over the same components: img2img, then (SDXL) LEDITS++."""
    model, steps, guidance = bench.model, bench.setup["steps"], bench.setup["guidance"]
    n, images = bench.setup["img2img_batch"], bench.images
    if not args.skip_img2img:
        pipe = (sdxl_img2img if args.family == "sdxl" else flux_img2img)(model)
        size = {} if args.family == "sdxl" else dict(height=bench.size, width=bench.size)
        print(f"{args.family} img2img, {n} images per call ...", flush=True)
        bench.baseline(f"diffusers {type(pipe).__name__} (strength {STRENGTH})", pipe,
                       lambda: run_img2img(pipe, images[:n], steps, guidance, **size), n)
    if args.family == "sdxl" and not args.skip_ledits:
        pipe = sdxl_ledits(model)
        print("sdxl LEDITS++, 1 image per call ...", flush=True)
        bench.baseline(f"diffusers {type(pipe).__name__} (invert + edit)", pipe,
                       lambda: run_ledits(pipe, images[:1], steps), 1)


# -- the run --------------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_argument(p)
    p.add_argument("--family", required=True, choices=sorted(FAMILY))
    p.add_argument("--batch", default="1,8", help="our images per call, comma-separated (default 1,8)")
    p.add_argument("--img2img-batch", type=int, default=None, help="img2img images per call (sdxl 8, flux 4)")
    p.add_argument("--steps", type=int, default=None, help=f"steps (default: the family's; --tiny: {TINY_STEPS})")
    p.add_argument("--guidance", type=float, default=None, help="default: the family's (sdxl 5.0, flux 3.5)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="our denoiser's rows per call at most (bounds memory; default 16)")
    p.add_argument("--tiny", action="store_true", help=f"shapes/tiny.py's tiny models, {TINY_SIZE} px (a CPU smoke run)")
    p.add_argument("--dry-build", action="store_true", help="build the real configs on the meta device, count, exit")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--compile", action="store_true", help="time our engine compiled (model.compile()) instead of eager")
    p.add_argument("--skip-img2img", action="store_true")
    p.add_argument("--skip-ledits", action="store_true")
    p.add_argument("--append", action="store_true", help="keep the rows of an earlier result file this run does not redo")
    return p.parse_args(argv)


def make_setup(args, device, model: DiffEditModel, dtype, build_s: float) -> dict:
    """What the run measures with: sizes, steps, guidance, the edit config, matmul rate, weight memory."""
    steps = args.steps or (TINY_STEPS if args.tiny else model.recommended.get("steps", EditConfig().encode.num_steps))
    guidance = args.guidance or model.recommended.get("guidance", EditConfig().decode.guidance)
    config = EditConfig.from_flat(model.recommended, steps=steps, guidance=guidance)
    rate = matmul_rate(device, dtype)
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(family=args.family, model=model.source, size=TINY_SIZE if args.tiny else model.resolution,
                dtype=str(dtype), vae_dtype=str(model.vae.dtype), steps=steps, guidance=guidance,
                edit_config=config.flat(),
                batches=[int(b) for b in args.batch.split(",")], max_batch=args.max_batch,
                img2img_batch=args.img2img_batch or FAMILY[args.family]["img2img_batch"], compiled=args.compile,
                matmul_tflops=rate / 1e12 if rate else None, weights_gib=weights_gib(model),
                resident_gib=resident, build_s=build_s)


def main(argv=None):
    args = parse_args(argv)
    diffusers_logging.set_verbosity_error()  # not its per-call "modules that should be kept in float32" notes
    if args.dry_build:
        return dry_build(args)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("The real-size models need a CUDA GPU; on the CPU use --tiny (or --dry-build).")
    dtype = FAMILY[args.family]["dtype"] if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"building {args.family} ({'tiny' if args.tiny else 'real config, random weights'}) on {device} ...", flush=True)
    model = make_model(args.family, args.tiny, device, dtype, Path(tempfile.mkdtemp(prefix="bench_families-")),
                       args.max_batch)
    setup = make_setup(args, device, model, dtype, time.perf_counter() - start)
    print(json.dumps(dict(environment(device), **setup), default=str), flush=True)
    print("weights (GiB): " + ", ".join(f"{k} {v:.4g}" for k, v in setup["weights_gib"].items()) + "; resident "
          f"after building: {setup['resident_gib'] and round(setup['resident_gib'], 2)} GiB", flush=True)
    bench = Bench(args, device, model, setup)
    with torch.no_grad():
        for n in [] if args.compile else setup["batches"]:
            print(f"ours, {n} images per call ...", flush=True)
            bench.ours(n)
        run_baselines(bench, args)  # eager, before anything is compiled: the pipelines share our denoiser
        if args.compile:
            model.compile()
            for n in setup["batches"]:
                print(f"ours compiled, {n} images per call ...", flush=True)
                bench.ours(n, compiled=True)
    bench.write(echo=True)
    return 0


def write_table(path: Path, device, setup: dict, rows: list[dict], echo: bool = True):
    env = environment(device)
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    weights = ", ".join(f"{k} {v:.3g}" for k, v in setup["weights_gib"].items())
    lines = [f"device: {env['device']}; torch {env['packages']['torch']}; diffusers {env['packages'].get('diffusers')}; "
             f"{setup['family']} at {setup['size']} px, {setup['dtype']} (VAE {setup['vae_dtype']}); {setup['steps']} steps, "
             f"guidance {setup['guidance']}; measured matmul rate {fmt(setup['matmul_tflops'], '.0f')} TFLOP/s",
             f"weights (GiB): {weights}; resident after building: {fmt(setup['resident_gib'], '.1f')} GiB; "
             f"our --max-batch {setup['max_batch']}", f"command: {env['command']}", "",
             "| variant | images/call | s/call | edits/s | denoiser evals/edit | denoiser evals/s | TFLOP/edit "
             "| share of FLOP floor | peak GiB | compile s | finite |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['images_per_call']} | {r['seconds']:.3f} | {r['edits_per_s']:.3f} | "
                     f"{r['denoiser_evals_per_edit']:.0f} | {r['denoiser_evals_per_s']:.1f} | {fmt(r['tflop_per_edit'], '.4g')} | "
                     f"{fmt(r['floor_share'], '.1%')} | {fmt(r['peak_gib'], '.1f')} | {fmt(r['compile_s'], '.0f')} | "
                     f"{fmt(r['finite'], '')} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
