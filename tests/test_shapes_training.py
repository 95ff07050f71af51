"""The shapes world's trainers: the flow model's conditioning and objective agree with the SD3 family the engine
runs, its folder loads through the SD3 path, a run resumes from its EMA-only checkpoint, and the UNet trainer
continues a saved model with its VAE untouched. Tiny budgets on the CPU: these check the code, not the models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffedit.shapes import train, train_flow

MODELS = Path(__file__).resolve().parents[1] / "models"
TINY = ["--pool", "48", "--batch", "4", "--workers", "1", "--layers", "1"]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    argv = ["--out", str(out), "--init", str(MODELS / "shapes-ldm"), "--total-minutes", "0.02", *TINY]
    assert train_flow.main(argv) == 0
    first = json.loads((out / "ckpt" / "progress.json").read_text())
    assert train_flow.main([*argv, "--total-minutes", "0.04", "--resume"]) == 0
    return out, first


def test_flow_folder_loads_through_the_sd3_family(flow_run):
    from diffedit.stages.model import load_model
    from diffedit.stages.sources import describe_model

    out, _ = flow_run
    folder = out / "model"
    assert describe_model(str(folder))["family"] == "sd3"
    model = load_model(folder, device="cpu", dtype="fp32")
    assert model.family.name == "sd3" and "text_encoder_3" not in model.parts
    vae = json.loads((folder / "vae" / "config.json").read_text())
    progress = json.loads((out / "ckpt" / "progress.json").read_text())
    assert vae["shift_factor"] == pytest.approx(progress["shift_factor"]) and vae["scaling_factor"] != 1.0
    assert json.loads((folder / "diffedit.json").read_text()) == train_flow.FLOW_DEFAULTS


def test_training_conditioning_is_the_engines(flow_run):
    """The conditioning the transformer trains on is what stages.families.SD3 gives it at edit time."""
    from diffedit.stages.model import load_model

    model = load_model(flow_run[0] / "model", device="cpu", dtype="fp32")
    prompts = ["a red circle on a gray background", "", "a blue star and a white square on a beige background"]
    text = model.encode_text(prompts)
    tok = model.parts["tokenizer"]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds, pooled = train_flow.sd3_conditioning(model.parts["text_encoder"], model.parts["text_encoder_2"], ids,
                                                     model.denoiser.config.joint_attention_dim)
    assert embeds.shape == text.embeds.shape and torch.equal(embeds, text.embeds)
    assert torch.equal(pooled, text.parts["pooled"])


def test_flow_objective_matches_the_engines_time_and_direction():
    """For data that is one latent z0, the best velocity at x_s is (x_s - z0) / s: its loss is zero only if the
    trainer's x_s, target and time input (s x 1000) are the convention the SD3 family's Euler steps follow."""

    class Oracle(torch.nn.Module):
        def __init__(self, z0):
            super().__init__()
            self.z0 = z0

        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections):
            s = (timestep / 1000).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (hidden_states - self.z0) / s})

    z0 = torch.randn(1, 4, 8, 8).expand(6, -1, -1, -1)
    loss = train_flow.flow_loss(Oracle(z0), z0, None, None)
    assert loss.item() < 1e-8
    assert train_flow.flow_loss(Oracle(-z0), z0, None, None).item() > 0.1
    # the same oracle, fed the SD3 family's time input and walked by its schedule's Euler steps, lands on z0
    from types import SimpleNamespace

    from diffedit.stages.families import FAMILY_CODE
    from diffedit.stages.schedules import FlowSchedule

    schedule, sd3 = FlowSchedule({"shift": 1.0}, 20, 20), FAMILY_CODE["sd3"]
    x = torch.randn_like(z0)
    for i in range(20):
        t = sd3.model_time(schedule.sigmas[i], 6, SimpleNamespace(device=torch.device("cpu")))
        x = schedule.denoise(Oracle(z0)(x, t, None, None).sample, i, x)
    assert torch.allclose(x, z0, atol=1e-5)


def test_flow_run_resumes_from_its_checkpoint(flow_run):
    out, first = flow_run
    progress = json.loads((out / "ckpt" / "progress.json").read_text())
    assert progress["invocations"] == 2 and progress["flow_step"] > first["flow_step"] > 0
    assert progress["flow_seconds"] >= 0.04 * 60 and progress["flow_done"]
    assert progress["shift_factor"] == first["shift_factor"]  # measured once, kept across invocations
    rows = np.loadtxt(out / "loss_flow.csv", delimiter=",", skiprows=1, ndmin=2)
    assert len(rows) >= 2 and rows[-1, 0] == progress["flow_step"] and np.all(np.isfinite(rows[:, 2]))


def test_flow_trainer_continues_a_saved_flow_model(flow_run, tmp_path):
    from safetensors.torch import load_file

    saved = flow_run[0] / "model"
    out = tmp_path / "flow2"
    argv = ["--out", str(out), "--init", str(MODELS / "shapes-ldm"), "--init-flow", str(saved), "--total-minutes",
            "0.01", "--seed", "1", *TINY]  # another seed: a fresh transformer would differ from the saved one
    assert train_flow.main(argv) == 0
    progress = json.loads((out / "ckpt" / "progress.json").read_text())
    vae = json.loads((saved / "vae" / "config.json").read_text())
    assert progress["shift_factor"] == vae["shift_factor"] and progress["init_flow"] == str(saved)
    after, before = (load_file(p / "transformer" / "diffusion_pytorch_model.safetensors") for p in (out / "model", saved))
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) < 1e-2  # continued, not new


def test_unet_trainer_continues_a_saved_model(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ldm2"
    argv = ["--out", str(out), "--init", str(MODELS / "shapes-ldm"), "--unet-minutes", "0.02", "--pool", "48",
            "--unet-batch", "4", "--workers", "1", "--pool-cache", str(tmp_path / "pool"), "--resume"]
    assert train.main(argv) == 0
    progress = json.loads((out / "ckpt" / "progress.json").read_text())
    assert progress["init"] == str(MODELS / "shapes-ldm") and progress["unet_step"] > 0 and "vae_step" not in progress
    saved, before = (load_file(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (out / "model", MODELS / "shapes-ldm"))
    assert all(torch.equal(saved[k], before[k]) for k in before)  # the VAE is the init's, bit for bit
    unet = load_file(out / "ckpt" / "unet.safetensors")  # the trained weights in float32 (the export is fp16 EMA)
    unet_before = load_file(MODELS / "shapes-ldm" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(unet[k], unet_before[k].float()) for k in unet_before)  # and the UNet trained on
    assert max((unet[k] - unet_before[k].float()).abs().max().item() for k in unet_before) < 1e-2  # from the init
    assert list((tmp_path / "pool").glob("pool-*.npz"))


def test_unet_trainer_puts_a_larger_unet_beside_a_saved_models_vae_and_text_encoder(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "large"
    argv = ["--out", str(out), "--init", str(MODELS / "shapes-ldm"), "--unet-channels", "32,64,96", "--unet-minutes",
            "0.02", "--pool", "48", "--unet-batch", "4", "--workers", "1", "--resume"]
    assert train.main(argv) == 0
    assert train.main(argv) == 0  # done: loads its EMA checkpoint into a UNet of the same widths and exports again
    config = json.loads((out / "model" / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [32, 64, 96]
    progress = json.loads((out / "ckpt" / "progress.json").read_text())
    assert progress["config"]["unet_channels"] == [32, 64, 96] and progress["unet_step"] > 0
    for part, name, tolerance in [("vae", "diffusion_pytorch_model", 0.0), ("text_encoder", "model", 1e-2)]:
        before = load_file(MODELS / "shapes-ldm" / part / f"{name}.safetensors")
        after = load_file(out / "model" / part / f"{name}.safetensors")
        # the saved model's weights (the VAE bit for bit, the text encoder trained on a few steps), not fresh ones
        assert max((after[k].float() - before[k].float()).abs().max().item() for k in before) <= tolerance
    for bad in ("64,x,128", "64,144,128", "64,96"):  # a one-line usage error, not a traceback (GroupNorm's)
        with pytest.raises(SystemExit):
            train.main(["--out", str(out), "--unet-channels", bad])


def test_pool_cache_is_generated_once(tmp_path):
    a = train.cached_pool(5, 6, 1, str(tmp_path))
    stamp = next(tmp_path.glob("*.npz")).stat().st_mtime_ns
    b = train.cached_pool(5, 6, 1, str(tmp_path))
    assert next(tmp_path.glob("*.npz")).stat().st_mtime_ns == stamp
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert a[1] == train.generate_pool(5, 6, 1)[1]
