"""Train the shapes world's rectified-flow model, in Stable Diffusion 3's layout, on one GPU, offline.

The model is an ``SD3Transformer2DModel`` over 2 x 2 patches of the shipped LDM's latents (its VAE reused, frozen,
with SD3's latent shift and scale measured on the training scenes), conditioned as StableDiffusion3Pipeline does
without T5: two CLIP text encoders with projections (the first starts from the LDM's trained text encoder, the
second is small and fresh), their penultimate states concatenated and followed by 256 zero tokens, their pooled
projections concatenated. It is trained with the rectified-flow objective of SD3 (Esser et al. 2024, arXiv
2403.03206): x_s = (1 - s) x_0 + s e, the target velocity e - x_0, the noise level s drawn logit-normal(0, 1), and
12% of captions dropped to the empty prompt (the unconditional model that guidance and DiffEdit's encoding use).
The text encoders train with the transformer. The shipped weights are an exponential moving average.

    python -m diffedit.shapes.train_flow --out runs/flow --init models/shapes-ldm --total-minutes 17 [--minutes 8.5] [--resume]
    python -m diffedit.shapes.train_flow --out runs/flow2 --init models/shapes-ldm --init-flow models/shapes-flow ...

The result is a diffusers folder (``OUT/model``: StableDiffusion3Pipeline's layout, fp16 safetensors, no T5, plus
``diffedit.json``) that ``diffedit run --model`` loads through the SD3 family, the loss curve (``OUT/loss_flow.csv``)
and ``OUT/metrics.json``. Checkpoints (EMA weights and progress) go to ``OUT/ckpt`` every minute, as in
:mod:`diffedit.shapes.train`. Tensor names carry their shapes: B batch, C channels, H/W height/width, L tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffedit.shapes import scenes
from diffedit.shapes.train import (EMA, Checkpoint, _ShadowView, append_csv, cached_pool, encode_pool, load_init,
                                   lr_at, n_params, start_run)
from diffedit.stages.families import SD3_T5_TOKENS

# Recommended DiffEdit defaults of the flow model (the `diffedit run` option names). Steps: the paper's 50 (the SD3
# family's default is its pipelines' 28). Threshold and encoding ratio: chosen on the tuning scenes (seed 1) by
# bench/tune_defaults.py for the shipped weights (docs/quality/flow/tuning.jsonl, docs/QUALITY.md): threshold 0.75
# tightened the mask at the same success, and r = 0.8 had the most colour + shape successes and the most background.
FLOW_DEFAULTS = {"steps": 50, "threshold": 0.75, "encode_ratio": 0.8}


@dataclass
class FlowConfig:
    out: str
    init: str  # the LDM folder whose VAE, tokenizer and text encoder are reused
    total_minutes: float = 17.0  # training-time budget, summed over invocations
    minutes: float | None = None  # wall-clock limit of this invocation
    resume: bool = False
    seed: int = 0
    pool: int = 150_000
    batch: int = 512
    lr: float = 5e-4
    caption_dropout: float = 0.12
    ema_decay: float = 0.999
    layers: int = 5
    heads: int = 4  # of 32 channels each
    shift: float = 1.0  # the scheduler's shift at inference (64 x 64 scenes: SD3's shift 3 is for 1024 x 1024)
    workers: int = 0
    pool_cache: str | None = None
    init_flow: str | None = None  # a saved flow model to train further (fresh optimizer and schedule)


def build_flow_models(cfg: FlowConfig, ldm_text_encoder, tokenizer):
    """(transformer, text_encoder, text_encoder_2, scheduler); the first text encoder holds the LDM's weights."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    saved = {k: v for k, v in ldm_text_encoder.config.to_dict().items() if k not in ("dtype", "torch_dtype")}
    config = CLIPTextConfig(**{**saved, "projection_dim": 64})
    text_encoder = CLIPTextModelWithProjection(config).float()
    # The LDM's CLIPTextModel is the transformer of this one (whose projection is new); transformers 4 nests it
    # as ``text_model``, 5 does not.
    ldm = getattr(ldm_text_encoder, "text_model", ldm_text_encoder)
    text_encoder.text_model.load_state_dict(ldm.state_dict())
    small = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
             "projection_dim": 32}
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**saved, **small})).float()
    joint = config.hidden_size + small["hidden_size"]
    transformer = SD3Transformer2DModel(
        sample_size=scenes.SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=32, num_attention_heads=cfg.heads, joint_attention_dim=joint,
        caption_projection_dim=32 * cfg.heads, pooled_projection_dim=config.projection_dim + small["projection_dim"],
        pos_embed_max_size=24)  # 24 patches: 192 px, room for every aspect-ratio bucket of a 64 x 64 budget
    return transformer, text_encoder, text_encoder_2, FlowMatchEulerDiscreteScheduler(shift=cfg.shift)


def load_flow_weights(folder: str, models, progress: dict):
    """Start from a saved flow model (``--init-flow``): its transformer's and text encoders' weights, and its VAE's
    latent normalisation."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    saved = (SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer"),
             CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder"),
             CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    for model, source in zip(models, saved):
        model.load_state_dict({k: v.float() for k, v in source.state_dict().items()})
    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    progress.update(shift_factor=vae["shift_factor"], scaling_factor=vae["scaling_factor"], init_flow=folder)


def sd3_conditioning(text_encoder, text_encoder_2, ids_BL: torch.Tensor, joint_dim: int):
    """StableDiffusion3Pipeline's conditioning without T5 (stages.families.SD3.encode_text), from token ids:
    (B x (L + 256) x joint_dim tokens, B x P pooled)."""
    out_1 = text_encoder(ids_BL, output_hidden_states=True)
    out_2 = text_encoder_2(ids_BL, output_hidden_states=True)
    clip_BLD = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    clip_BLD = torch.nn.functional.pad(clip_BLD, (0, joint_dim - clip_BLD.shape[-1]))
    zeros = clip_BLD.new_zeros(clip_BLD.shape[0], SD3_T5_TOKENS, joint_dim)
    return torch.cat([clip_BLD, zeros], dim=1), torch.cat([out_1[0], out_2[0]], dim=-1)


def flow_loss(transformer, z0_BCHW, cond, pooled, generator=None) -> torch.Tensor:
    """The rectified-flow loss: MSE between the predicted and the true velocity e - x_0 at x_s = (1 - s) x_0 + s e,
    with s logit-normal(0, 1) (SD3's sampling); the model's time input is s x 1000, as the SD3 family feeds it."""
    B = z0_BCHW.shape[0]
    s_B = torch.sigmoid(torch.randn(B, device=z0_BCHW.device, generator=generator))
    e_BCHW = torch.randn(z0_BCHW.shape, device=z0_BCHW.device, generator=generator)
    s = s_B.view(-1, 1, 1, 1)
    xs_BCHW = (1 - s) * z0_BCHW + s * e_BCHW
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=z0_BCHW.device.type == "cuda"):
        v_BCHW = transformer(hidden_states=xs_BCHW, timestep=s_B * 1000, encoder_hidden_states=cond,
                             pooled_projections=pooled).sample.float()
    return ((v_BCHW - (e_BCHW - z0_BCHW)) ** 2).mean()


class FlowTrainer:
    """The training loop's state: models, their EMAs, the optimizer, the latent pool and the token ids."""

    def __init__(self, cfg: FlowConfig, models, latents, ids_BL, empty_L, progress: dict, ckpt: Checkpoint):
        self.cfg, self.progress, self.ckpt = cfg, progress, ckpt
        self.transformer, self.text_encoder, self.text_encoder_2 = models
        self.means, self.stds = latents
        self.ids_BL, self.empty_L = ids_BL, empty_L
        self.params = [p for m in models for p in m.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.01)
        self.emas = {f"ema_{n}": EMA(m, cfg.ema_decay) for n, m in zip(("transformer", "text", "text_2"), models)}
        if cfg.resume:  # the checkpoint keeps the averages only: training goes on from them, with a fresh optimizer
            ckpt.load({n: _ShadowView(e) for n, e in self.emas.items()}, {})
            with torch.no_grad():
                for ema in self.emas.values():
                    torch._foreach_copy_([p for p in ema.module.parameters()], ema.shadow)
        self.log: list[tuple] = []

    def step(self, lr: float) -> torch.Tensor:
        cfg, device = self.cfg, self.means.device
        for g in self.opt.param_groups:
            g["lr"] = lr
        idx_B = torch.randint(0, self.means.shape[0], (cfg.batch,), device=device)
        shift, scale = self.progress["shift_factor"], self.progress["scaling_factor"]
        z0_BCHW = (self.means[idx_B] + self.stds[idx_B] * torch.randn_like(self.means[idx_B]) - shift) * scale
        ids = self.ids_BL[idx_B].clone()
        ids[torch.rand(cfg.batch, device=device) < cfg.caption_dropout] = self.empty_L
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond, pooled = sd3_conditioning(self.text_encoder, self.text_encoder_2, ids,
                                            self.transformer.config.joint_attention_dim)
        loss = flow_loss(self.transformer, z0_BCHW, cond, pooled)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        for ema in self.emas.values():
            ema.update()
        return loss

    def save(self, step: int, seconds: float):
        self.progress.update(flow_step=step, flow_seconds=seconds)
        self.ckpt.save({n: _ShadowView(e) for n, e in self.emas.items()}, {}, self.progress)

    def train(self, deadline: float):
        budget = self.cfg.total_minutes * 60
        step, spent = self.progress.get("flow_step", 0), self.progress.get("flow_seconds", 0.0)
        first, t0, last_save = step, time.time(), time.time()
        while spent + (time.time() - t0) < budget and time.time() < deadline:
            loss = self.step(lr_at(self.cfg.lr, (spent + time.time() - t0) / budget, step - first))
            step += 1
            if step % 50 == 0:
                self.log.append((step, spent + time.time() - t0, loss.item()))
            if time.time() - last_save > 60:
                self.save(step, spent + time.time() - t0)
                last_save = time.time()
        if step > first and step % 50:  # the curve ends where training stopped
            self.log.append((step, spent + time.time() - t0, loss.item()))
        self.save(step, spent + time.time() - t0)
        self.progress["flow_done"] = self.progress["flow_seconds"] >= budget
        self.ckpt.save({}, {}, self.progress)
        print(f"flow: {step} steps, {self.progress['flow_seconds']:.0f} s", flush=True)

    def averaged(self):
        """The models with their EMA weights."""
        return tuple(self.emas[n].state_module() for n in ("ema_transformer", "ema_text", "ema_text_2"))


def export(out: Path, transformer, text_encoder, text_encoder_2, tokenizer, scheduler, vae, progress: dict) -> Path:
    from diffusers import StableDiffusion3Pipeline

    vae.register_to_config(shift_factor=progress["shift_factor"], scaling_factor=progress["scaling_factor"])
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                    tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.to(torch.float16).save_pretrained(out / "model", safe_serialization=True)
    (out / "model" / "diffedit.json").write_text(json.dumps(FLOW_DEFAULTS, indent=1) + "\n")
    return out / "model"


def plot_curves(curves: dict[str, Path], out_png: Path):
    """One panel per loss curve (name -> CSV of step,seconds,loss), log scale; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    import numpy as np

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, path) in zip(axes[0], curves.items()):
        data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
        if data.shape[-1] == 3:  # a curve without rows yet is left empty
            ax.plot(data[:, 0], data[:, 2])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def parse(argv=None) -> FlowConfig:
    p = argparse.ArgumentParser(prog="python -m diffedit.shapes.train_flow", description=__doc__.split("\n\n")[0])
    d = FlowConfig(out="", init="")
    p.add_argument("--out", required=True, help="run folder: ckpt/, model/, loss_flow.csv, metrics.json")
    p.add_argument("--init", required=True, help="the shapes LDM folder (VAE, tokenizer, first text encoder)")
    p.add_argument("--total-minutes", type=float, default=d.total_minutes, help="training budget over all invocations")
    p.add_argument("--minutes", type=float, default=None, help="stop this invocation after this many minutes")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    for name in ("pool", "batch", "layers", "heads", "workers", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(d, name))
    for name in ("lr", "shift"):
        p.add_argument(f"--{name}", type=float, default=getattr(d, name))
    p.add_argument("--pool-cache", default=None, help="folder to share the generated scenes with trainers beside")
    p.add_argument("--init-flow", default=None, help="a saved flow model (e.g. models/shapes-flow) to train further")
    return FlowConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = parse(argv)
    start, deadline, out, device = start_run(cfg.out, cfg.minutes)
    torch.manual_seed(cfg.seed)
    vae, ldm_text_encoder, _, _, tokenizer = load_init(cfg.init)
    transformer, text_encoder, text_encoder_2, scheduler = build_flow_models(cfg, ldm_text_encoder, tokenizer)
    models = (transformer, text_encoder, text_encoder_2)
    ckpt = Checkpoint(out)
    progress = ckpt.progress() if cfg.resume else {}
    if cfg.init_flow and not progress:
        load_flow_weights(cfg.init_flow, models, progress)
    invocation = progress.get("invocations", 0)
    progress.update(invocations=invocation + 1, config=asdict(cfg))
    counts = {"transformer": n_params(transformer), "text_encoder": n_params(text_encoder),
              "text_encoder_2": n_params(text_encoder_2)}
    print("parameters:", counts, flush=True)
    for m in (vae, *models):
        m.to(device)
    vae.requires_grad_(False).eval()

    t = time.time()
    seed = scenes.TRAIN_SEED_MIN + cfg.seed + invocation
    images, captions, _ = cached_pool(seed, cfg.pool, cfg.workers, cfg.pool_cache)
    means, stds = encode_pool(vae, torch.from_numpy(images).to(device), device)
    if "scaling_factor" not in progress:  # SD3's latent normalisation: zero mean, unit variance
        progress.update(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    print(f"pool: {len(captions)} scenes of seed {seed} in {time.time() - t:.1f} s", flush=True)
    ids_BL = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    empty_L = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids[0].to(device)
    trainer = FlowTrainer(cfg, models, (means, stds), ids_BL, empty_L, progress, ckpt)
    progress["flow_done"] = progress.get("flow_seconds", 0.0) >= cfg.total_minutes * 60  # a budget may be raised
    ckpt.save({}, {}, progress)
    if not progress["flow_done"]:
        for m in models:
            m.train()
        trainer.train(deadline)
    append_csv(out / "loss_flow.csv", "step,seconds,loss", trainer.log)
    plot_curves({"flow loss (velocity MSE)": out / "loss_flow.csv"}, out / "loss_flow.png")
    averaged = [m.float().cpu() for m in trainer.averaged()]
    folder = export(out, *averaged, tokenizer, scheduler, vae.float().cpu(), progress)
    metrics = {k: v for k, v in progress.items() if k != "config"}
    metrics.update(parameters=counts, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   config=asdict(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    print(f"saved {folder} ({size:.2f} MB) in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
