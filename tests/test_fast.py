"""The speed flags: DPM-Solver++(2M) over the DDIM levels, feature reuse across steps, fp8, the compile cache and
--preset fast (docs/BENCHMARKS.md, "Faster edits"). Their quality is bench/fast_gate.py's; here, what each does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffedit.pipelines.config import PRESETS, EngineConfig, JobConfig, resolve_preset
from diffedit.pipelines.job import run_job
from diffedit.shapes.tiny import build_tiny_sd3
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import edit_batch
from diffedit.stages.model import fp8_able, load_model
from diffedit.stages.reuse import full_forward, reusable, shallow_forward
from diffedit.stages.schedules import DDIMSchedule

SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


# -- DPM-Solver++(2M) ---------------------------------------------------------------------------------------------

def gaussian_oracle(alphas, data_var: float, prediction_type: str):
    """The exact denoiser of Gaussian data N(0, data_var): its ODE maps x_s to x_t by the ratio of the marginals'
    standard deviations, so a solver's error is measurable."""

    def predict(x, t):
        a = float(alphas[int(t)])
        x0 = math.sqrt(a) * data_var / (a * data_var + 1 - a) * x
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return eps if prediction_type == "epsilon" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0

    return predict


def walk(solver: str, steps: int, direction: str, prediction_type: str = "epsilon", data_var: float = 0.25):
    """Max error of decoding (or encoding) Gaussian data against the exact ODE solution."""
    config = dict(SD15_DDIM, prediction_type=prediction_type)
    schedule = DDIMSchedule(config, steps, int(steps * 0.8), solver)
    alphas = schedule.forward.alphas_cumprod.double()
    predict = gaussian_oracle(alphas, data_var, prediction_type)
    std = lambda a: math.sqrt(a * data_var + 1 - a)  # noqa: E731
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x.clone()
    if direction == "decode":
        for i, t in enumerate(schedule.decode_levels):
            y = schedule.denoise(predict(y, t), i, y)
        start, end = float(alphas[int(schedule.decode_levels[0])]), float(schedule.forward.final_alpha_cumprod)
    else:
        x = x * std(float(schedule.inverse.initial_alpha_cumprod))
        y = x.clone()
        for k, t in enumerate(schedule.encode_levels):
            y = schedule.invert(predict(y, t), k, y)
        start, end = float(schedule.inverse.initial_alpha_cumprod), float(alphas[int(schedule.encode_levels[-1])])
    return float((y - x * std(end) / std(start)).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpm_solver_decodes_closer_to_the_exact_flow_than_ddim(prediction_type):
    for steps in (50, 25, 15):
        ddim, dpm = walk("ddim", steps, "decode", prediction_type), walk("dpm", steps, "decode", prediction_type)
        assert dpm < 0.7 * ddim, (steps, ddim, dpm)


def test_dpm_solver_inversion_stays_near_the_exact_level():
    """Inversion evaluates the model at the level it climbs to, as DDIM inversion does: there the correction does
    not beat DDIM on this denoiser (docs/BENCHMARKS.md), but without the guard on uneven steps (the first step,
    from the image, is a fraction of the next) it was 8x DDIM's error at 50 steps; now within 3x."""
    for steps in (50, 25, 15):
        assert walk("dpm", steps, "encode") < 4 * walk("ddim", steps, "encode"), steps


def test_dpm_solver_first_step_is_ddims_and_the_schedule_keeps_ddims_levels():
    ddim, dpm = DDIMSchedule(SD15_DDIM, 20, 16, "ddim"), DDIMSchedule(SD15_DDIM, 20, 16, "dpm")
    assert torch.equal(ddim.decode_levels, dpm.decode_levels) and torch.equal(ddim.encode_levels, dpm.encode_levels)
    x, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(dpm.denoise(pred, 0, x), ddim.denoise(pred, 0, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpm.invert(pred, 0, x), ddim.invert(pred, 0, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dpm.denoise(pred * 0.5, 1, x), ddim.denoise(pred * 0.5, 1, x))  # second order
    with pytest.raises(ValueError, match="`solver` must be one of ddim, dpm"):
        DDIMSchedule(SD15_DDIM, 20, 16, "heun")


# -- feature reuse ------------------------------------------------------------------------------------------------

def test_the_split_unet_is_diffusers_unet_bit_for_bit(tiny_model):
    unet = tiny_model.denoiser
    assert reusable(unet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([900.0, 500.0, 20.0])
    text = tiny_model.encode_text(["a red circle", "a blue square", ""]).embeds
    reference = unet(x, t, encoder_hidden_states=text).sample
    out, deep = full_forward(unet, x, t, text)
    assert torch.equal(out, reference)
    assert torch.equal(shallow_forward(unet, x, t, text, deep), reference)  # the deep features of the same call


def test_the_split_sdxl_unet_adds_its_text_and_size_embedding_as_diffusers_does(tmp_path):
    from diffedit.shapes.tiny import build_tiny_sdxl

    sdxl = load_model(build_tiny_sdxl(tmp_path / "sdxl"), device="cpu", dtype="fp32")
    unet, g = sdxl.denoiser, torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 30.0])
    text = sdxl.encode_text(["a red circle", "a photo of a dog"])
    added = {"text_embeds": text.parts["pooled"], "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}
    reference = unet(x, t, encoder_hidden_states=text.embeds, added_cond_kwargs=added).sample
    out, deep = full_forward(unet, x, t, text.embeds, added)
    assert reusable(unet) and torch.equal(out, reference)
    assert torch.equal(shallow_forward(unet, x, t, text.embeds, deep, added), reference)


def edit(model, n=2, **flat):
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = EditConfig.from_flat(dict(steps=10, mask_samples=2, threshold=0.0, **flat))
    return edit_batch(model, images, ["a red circle"] * n, ["a blue circle", "a green circle"][:n], [1, 2][:n], config)


def test_reuse_interval_one_is_the_plain_engine_and_larger_intervals_change_the_edit(tiny_model):
    plain = edit(tiny_model)
    same = edit(tiny_model, cache_interval=1, encode_cache_interval=1)
    assert torch.equal(plain.latents_BChw, same.latents_BChw)
    reused = edit(tiny_model, cache_interval=2)
    assert not torch.equal(plain.latents_BChw, reused.latents_BChw)
    assert torch.equal(reused.mask_Bhw, plain.mask_Bhw)  # the mask step never reuses
    both = edit(tiny_model, cache_interval=2, encode_cache_interval=3)
    assert not torch.equal(both.latents_BChw, reused.latents_BChw)


def test_reuse_keeps_each_denoiser_calls_own_features_and_batch_invariance(tiny_model):
    """A step split over several denoiser calls (max_batch) keeps one feature set per call: the same edits."""
    whole = edit(tiny_model, cache_interval=3)
    try:
        tiny_model.max_batch = 2  # 2 rows per call: 1 latent x 2 prompts, so each step runs 2 calls
        split = edit(tiny_model, cache_interval=3)
        alone = edit(tiny_model, n=1, cache_interval=3)
    finally:
        tiny_model.max_batch = None
    # Within float32 rounding (batched kernels sum in another order; tests/test_families.py allows 5e-4 on images);
    # features crossed between calls would differ by the edit itself.
    assert torch.equal(split.mask_Bhw, whole.mask_Bhw) and torch.equal(alone.mask_Bhw, whole.mask_Bhw[:1])
    torch.testing.assert_close(split.latents_BChw, whole.latents_BChw, rtol=0, atol=5e-4)
    torch.testing.assert_close(alone.latents_BChw, whole.latents_BChw[:1], rtol=0, atol=5e-4)
    other = edit(tiny_model, cache_interval=1)
    assert (other.latents_BChw - whole.latents_BChw).abs().max() > 5e-3  # the tolerance is far below reuse's effect


def test_under_cuda_graphs_each_denoiser_output_outlives_the_next_call(tiny_model_dir, monkeypatch):
    """With CUDA graphs (--compile-mode reduce-overhead) a compiled call returns the same output memory every time:
    an edit that keeps a call's output past the next call (a step split over calls, the mask's samples) must copy
    it. Emulated on the CPU: the UNet's output written into one buffer, as a captured graph does."""
    model = load_model(tiny_model_dir, device="cpu", dtype="fp32", max_batch=2)  # 2 rows a call: a step is 2 calls
    reference = edit(model)
    real, static = model.unet_forward, {}

    def one_buffer(*args, **kwargs):
        out = real(*args, **kwargs)
        buffer = static.setdefault(out.shape, torch.empty_like(out))
        return buffer.copy_(out)

    monkeypatch.setattr(model, "unet_forward", one_buffer)
    overwritten = edit(model)
    assert not torch.equal(overwritten.latents_BChw, reference.latents_BChw)  # what the error would have been
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)  # the mode, not a CPU compile
    graphed = edit(model.compile(mode="reduce-overhead", vae=False))
    assert torch.equal(graphed.latents_BChw, reference.latents_BChw)


def test_reuse_and_dpm_are_refused_for_a_transformer(tmp_path):
    sd3 = load_model(build_tiny_sd3(tmp_path / "sd3", t5=False), device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="Feature reuse .* needs a UNet of the SD or SDXL kind; sd3"):
        sd3.feature_reuse(2)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    for flag in ("cache_interval", "encode_cache_interval"):
        config = EditConfig.from_flat({"steps": 4, "mask_samples": 1, flag: 2})
        with pytest.raises(ValueError, match=f"Feature reuse \\(`{flag}` 2\\)"):
            edit_batch(sd3, images, ["a red circle"], ["a blue circle"], [0], config)
    with pytest.raises(ValueError, match="`solver` dpm applies to the diffusion families"):
        sd3.schedule(10, 8, (16, 16), solver="dpm")


def test_reuse_intervals_take_numpy_integers_as_ints():
    import numpy as np

    config = EditConfig.from_flat(cache_interval=np.int64(3), encode_cache_interval=np.int32(2))
    assert (config.decode.cache_interval, config.encode.cache_interval) == (3, 2)
    assert type(config.decode.cache_interval) is int and type(config.encode.cache_interval) is int


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_reuse_intervals_are_validated(bad):
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        EditConfig.from_flat(cache_interval=bad)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        EditConfig.from_flat(encode_cache_interval=bad)


# -- fp8, compile options -----------------------------------------------------------------------------------------

def test_fp8_takes_linear_layers_fp8_matmuls_can_run():
    assert fp8_able(torch.nn.Linear(320, 1280)) and fp8_able(torch.nn.Linear(64, 96, bias=False))
    assert not fp8_able(torch.nn.Linear(10, 64)) and not fp8_able(torch.nn.Linear(64, 10))
    assert not fp8_able(torch.nn.Linear(128, 128))  # torchao 0.17 misreads a 128 x 128 per-tensor scale
    assert not fp8_able(torch.nn.Conv2d(64, 64, 3))


def test_fp8_off_a_capable_gpu_is_a_clear_error(tiny_model):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has an fp8 GPU")
    with pytest.raises(ValueError, match="fp8 needs a CUDA GPU of compute capability 8.9 or more"):
        tiny_model.to_fp8()


def test_fp8_on_a_cpu_job_fails_at_once_in_one_line(tiny_model_dir, tmp_path, capsys):
    from diffedit.pipelines.cli import main

    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    code = main(["run", shard, "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--fp8",
                 "--device", "cpu", "--limit", "1"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.endswith("--fp8 needs GPU actors (CUDA compute capability 8.9+), but this job runs on "
                                       "the CPU (--device cpu)."), line
    assert not (tmp_path / "out" / "run.json").exists()  # refused before anything was recorded


def test_fp8_without_compile_gets_a_note_that_it_was_slower(tiny_model_dir, tmp_path):
    from diffedit.pipelines.job import plan_job

    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    for compile in (False, True):
        lines = []
        job = JobConfig.from_flat([shard], tmp_path / f"o{compile}", model=str(tiny_model_dir), fp8=True, compile=compile)
        plan_job(job, log=lines.append)
        notes = [line for line in lines if "--fp8 without --compile" in line]
        assert len(notes) == (0 if compile else 1), lines
        assert compile or notes[0].startswith("note: --fp8 without --compile ran at 0.72x fp16's speed")


def test_a_compile_cache_that_is_a_file_is_refused_and_a_relative_one_recorded_absolute(tiny_model_dir, tmp_path,
                                                                                         capsys, monkeypatch):
    from diffedit.pipelines.cli import main
    from diffedit.pipelines.job import plan_job

    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    (tmp_path / "afile").write_text("not a folder")
    code = main(["run", shard, "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--compile",
                 "--compile-cache", str(tmp_path / "afile")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and line.endswith(f"--compile-cache {tmp_path / 'afile'} is a file, not a folder."), line
    monkeypatch.chdir(tmp_path)
    job = JobConfig.from_flat([shard], tmp_path / "o", model=str(tiny_model_dir), compile=True, compile_cache="cc")
    plan = plan_job(job, log=lambda *a: None)
    assert plan.job.engine.compile_cache == str(tmp_path / "cc") == plan.run["engine"]["compile_cache"]


@pytest.mark.slow
def test_a_compile_cache_that_cannot_be_read_or_written_costs_a_warning_not_the_job(tmp_path):
    import threading
    from types import SimpleNamespace

    from diffedit.pipelines.actor import EditActor
    from diffedit.stages.compile_cache import CompileCache

    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    cache = CompileCache(blocked / "cache", torch.device("cpu"))
    assert cache.load() == 0  # nothing readable there: no graphs, no error
    torch.compile(lambda x: torch.sin(x) * 2, dynamic=False)(torch.randn(8))  # something new to save
    with pytest.raises(OSError):
        cache.save()
    actor = SimpleNamespace(compiled=cache, _graphs_saved=-1, _device=threading.Lock())
    with pytest.warns(UserWarning, match="compile cache not written"):
        EditActor._save_compiled(actor)  # what the actor does after a batch that compiled


def test_compile_options_need_compile():
    with pytest.raises(ValueError, match="need `--compile`"):
        EngineConfig(compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="need `--compile`"):
        EngineConfig(compile_cache="/somewhere")
    with pytest.raises(ValueError, match="`--compile-mode` must be one of"):
        EngineConfig(compile=True, compile_mode="fastest")
    EngineConfig(compile=True, compile_mode="reduce-overhead", compile_cache="off")


# -- the preset ---------------------------------------------------------------------------------------------------

def test_the_preset_sets_its_values_and_explicit_flags_win(tiny_model_dir, tmp_path):
    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    base = dict(model=str(tiny_model_dir), limit=1, scores=False, mask_samples=2, preset="fast")
    run_job(JobConfig.from_flat([shard], tmp_path / "a", **base), log=lambda *a: None)
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["run"]["preset"] == "fast"
    assert {k: run["edit"][k] for k in PRESETS["fast"][1]} == PRESETS["fast"][1]
    run_job(JobConfig.from_flat([shard], tmp_path / "b", **base, steps=6), log=lambda *a: None)
    assert json.loads((tmp_path / "b" / "run.json").read_text())["edit"]["steps"] == 6


def test_the_preset_and_unet_flags_are_refused_for_a_flow_model_before_any_work(tmp_path, capsys):
    from diffedit.pipelines.cli import main

    with pytest.raises(ValueError, match="--preset fast is defined for sd, sdxl models"):
        resolve_preset("fast", "sd3")
    sd3 = build_tiny_sd3(tmp_path / "sd3", t5=False)
    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    for flags, message in ((["--preset", "fast"], "--preset fast is defined for sd, sdxl models"),
                           (["--solver", "dpm"], "--solver dpm applies to the UNet families (sd, sdxl)"),
                           (["--cache-interval", "2"], "--cache-interval applies to the UNet families")):
        code = main(["run", shard, "--output", str(tmp_path / "out"), "--model", str(sd3), *flags])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and message in line, line
    assert not (tmp_path / "out" / "manifest").exists() or not any((tmp_path / "out" / "manifest").iterdir())


# -- the compile cache --------------------------------------------------------------------------------------------

COMPILE_AND_SAVE = textwrap.dedent("""
    import json, sys, torch
    from diffedit.stages.compile_cache import CompileCache
    cache = CompileCache(sys.argv[1], torch.device("cpu"))
    loaded = cache.load()
    f = torch.compile(lambda x: torch.nn.functional.gelu(x @ x.T) * 3, dynamic=False)
    f(torch.randn(16, 16))
    saved = cache.save()
    print(json.dumps({"loaded": loaded, "saved": saved.name if saved else None}))
""")


@pytest.mark.slow
def test_a_second_process_loads_the_graphs_the_first_one_saved(tmp_path):
    def process(inductor: str) -> dict:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / inductor))
        out = subprocess.run([sys.executable, "-c", COMPILE_AND_SAVE, str(tmp_path / "shared")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = process("one")
    assert first["loaded"] == 0 and first["saved"]
    files = list((tmp_path / "shared").glob("*/*.bin"))
    assert len(files) == 1 and files[0].parent.name.startswith("torch-") and files[0].parent.name.endswith("-cpu")
    second = process("two")  # another node: its own empty Inductor folder
    assert second["loaded"] >= 1 and second["saved"] is None  # found the graph's artefacts; nothing new to add
    (files[0].parent / "broken.bin").write_bytes(b"not a cache")
    third = process("three")
    assert third == second  # the broken file is skipped (a warning), the good one used


@pytest.mark.slow
def test_a_compiled_job_writes_its_graphs_to_the_compile_cache_and_a_rerun_reads_them(tiny_model_dir, tmp_path):
    """The actor's path (pipelines.actor._engine_model): compile, then the graphs written under OUTPUT/compile-cache;
    a second job with that folder as --compile-cache finds them and adds nothing."""
    shard = str(sorted(SAMPLES.glob("*.tar"))[0])
    options = dict(model=str(tiny_model_dir), limit=1, scores=False, steps=4, mask_samples=2, compile=True,
                   batch_size=2)
    run_job(JobConfig.from_flat([shard], tmp_path / "a", **options), log=lambda *a: None)
    written = sorted((tmp_path / "a" / "compile-cache").glob("torch-*/*.bin"))
    assert len(written) == 1
    lines = []
    run_job(JobConfig.from_flat([shard], tmp_path / "b", compile_cache=str(tmp_path / "a" / "compile-cache"),
                                **options), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert sorted((tmp_path / "a" / "compile-cache").glob("torch-*/*.bin")) == written  # nothing new to add
    assert not (tmp_path / "b" / "compile-cache").exists()
