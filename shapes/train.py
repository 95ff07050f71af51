r"""Train the shapes world's latent diffusion model from scratch, on one GPU, offline.

Two phases, each with a time budget (minutes of training, summed over resumed invocations):
1. the VAE (AutoencoderKL, 64x64x3 -> 16x16x4): L1 + L2 reconstruction + a small KL term;
2. the UNet (UNet2DConditionModel) and the text encoder (CLIPTextModel), trained jointly on the frozen
   VAE's latents with the epsilon objective under Stable Diffusion's noise schedule, with caption dropout
   (12% empty captions) so classifier-free guidance and DiffEdit's unconditional encoding work.

Scenes are generated on the fly from :mod:`diffedit.shapes.scenes` with seeds >= TRAIN_SEED_MIN (held-out
evaluation scenes use seeds below it). Checkpoints go to ``OUT/ckpt`` every minute, so a run resumes
across several time-limited commands (``--resume``). The result is a Stable Diffusion folder
(``OUT/model``, fp16 safetensors, plus ``diffedit.json`` with recommended DiffEdit defaults), loss curves
(``OUT/loss_vae.csv``, ``OUT/loss_unet.csv``, ``OUT/loss.png`` when matplotlib is there) and
``OUT/metrics.json`` (VAE reconstruction PSNR on held-out scenes, parameter counts, steps, seconds).

    python -m diffedit.shapes.train --out runs/ldm --vae-minutes 3 --unet-minutes 5 [--minutes 9] [--resume]
    python -m diffedit.shapes.train --out runs/ldm2 --init models/shapes-ldm --unet-minutes 17 --unet-lr 2e-4

``--init`` continues a saved model (its VAE kept frozen, its UNet and text encoder trained further with a fresh
optimizer and schedule): the "more steps" way to a stronger model (docs/TRAINING.md). With ``--unet-channels`` it
keeps the saved VAE and text encoder and trains a fresh UNet of those block widths in place of the saved one: the
"larger UNet" way.

    python -m diffedit.shapes.train --out runs/large --init models/shapes-ldm --unet-channels 128,192,256 \
        --unet-minutes 22

Tensor names carry their shapes: B batch, C channels, H/W height/width, L tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from diffedit.shapes import scenes
from diffedit.stages import scores

# Recommended DiffEdit defaults for this small model (keys: the `diffedit run` option names), chosen on a tuning
# set of held-out scenes (bench/tune_defaults.py, docs/quality/tuning.jsonl): its inferred masks are about twice
# the object's area at the paper's threshold 0.5; 0.75 gave the same edit success with a tighter mask (IoU 0.49
# -> 0.61) and 1.3 dB more background. Guidance stays the paper's 7.5.
DIFFEDIT_DEFAULTS = {"threshold": 0.75}
UNET_CHANNELS = (64, 96, 128)  # the shipped UNet's block widths (4.8 M parameters)


@dataclass
class TrainConfig:
    out: str
    vae_minutes: float = 3.0  # training-time budget of the VAE phase (over all invocations)
    unet_minutes: float = 5.0  # training-time budget of the UNet + text encoder phase
    minutes: float | None = None  # wall-clock limit of this invocation (then checkpoint and stop)
    resume: bool = False
    seed: int = 0  # training scenes use seeds TRAIN_SEED_MIN + seed + (invocation number)
    pool: int = 200_000  # scenes generated per invocation, sampled from at random
    vae_batch: int = 128
    vae_lr: float = 6e-4
    kl_weight: float = 1e-6
    unet_batch: int = 512
    unet_lr: float = 4e-4
    caption_dropout: float = 0.12
    min_snr_gamma: float = 5.0  # Min-SNR weighting (Hang et al. 2023), which speeds up convergence
    ema_decay: float = 0.999
    workers: int = 0  # scene-generation processes; 0: all CPUs
    pool_cache: str | None = None  # a folder where the pool is saved once, for trainers running side by side
    init: str | None = None  # a saved Stable Diffusion folder to continue (VAE kept, UNet + text encoder trained on)
    unet_channels: tuple[int, int, int] | None = None  # a fresh UNet of these block widths (with init: in its place)
    eval_scenes: int = 512  # held-out scenes (seed 0) for the VAE's PSNR


# -- models ---------------------------------------------------------------------------------------------

def build_models(tokenizer, channels: tuple[int, int, int] = UNET_CHANNELS):
    from diffusers import AutoencoderKL

    from .tiny import clip_text_encoder, sd_ddim_scheduler

    # 3 blocks: 2 downsamplings, 64x64 -> 16x16 latents of 4 channels.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=scenes.SIZE,
    )
    text_encoder = clip_text_encoder(tokenizer, width=128, mlp_width=512, heads=4, max_positions=tokenizer.model_max_length)
    return vae, text_encoder, build_unet(channels), sd_ddim_scheduler()


def build_unet(channels: tuple[int, int, int] = UNET_CHANNELS):
    """A fresh UNet on the 16 x 16 x 4 latents, cross-attending to the 128-wide text encoder on its two upper levels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def load_init(folder: str):
    """(vae, text_encoder, unet, scheduler, tokenizer) of a saved Stable Diffusion folder, in float32, to train on."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").float()
    text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").float()
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").float()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    return vae, text_encoder, unet, scheduler, CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")


def make_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from .tiny import write_clip_tokenizer

    # Every word of the world is one token; captions are at most ~20 tokens, so 32 positions suffice.
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder, scenes.WORDS, model_max_length=32))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- data -----------------------------------------------------------------------------------------------

def _scenes_chunk(args):
    seed, start, stop = args
    images, captions, backgrounds = [], [], []
    for i in range(start, stop):
        s = scenes.make_scene(seed, i)
        images.append(s.image)
        captions.append(s.caption)
        backgrounds.append(~np.any(np.stack(s.masks), axis=0) if s.masks else np.ones(s.image.shape[:2], bool))
    return np.stack(images), captions, np.stack(backgrounds)


def generate_pool(seed: int, n: int, workers: int):
    """n scenes of ``seed`` (indices 0..n-1), in parallel: uint8 N x H x W x 3, captions, background masks."""
    chunk = 1000
    jobs = [(seed, a, min(a + chunk, n)) for a in range(0, n, chunk)]
    with Pool(workers or os.cpu_count()) as pool:
        parts = pool.map(_scenes_chunk, jobs)
    return (
        np.concatenate([p[0] for p in parts]),
        [c for p in parts for c in p[1]],
        np.concatenate([p[2] for p in parts]),
    )


def cached_pool(seed: int, n: int, workers: int, cache: str | None):
    """:func:`generate_pool`, saved in ``cache`` (when given) by the first of several trainers that ask for the same
    (seed, n) at once, and read by the others (a file lock makes them wait for it)."""
    if not cache:
        return generate_pool(seed, n, workers)
    import fcntl

    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pool-{seed}-{n}.npz"
    with open(folder / f"pool-{seed}-{n}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            images, captions, backgrounds = generate_pool(seed, n, workers)
            tmp = folder / f"pool-{seed}-{n}.tmp.npz"
            np.savez(tmp, images=images, captions=np.array(captions), backgrounds=backgrounds)
            os.replace(tmp, path)
    data = np.load(path)
    return data["images"], [str(c) for c in data["captions"]], data["backgrounds"]


def to_pixels(images_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float B x 3 x H x W in [-1, 1]."""
    return images_BHWC.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, region_BHW: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (data range 2), optionally over a region only (the scorer's
    formula, with the MSE floored at 1e-10 so that an exact reconstruction stays finite)."""
    err_BHW = ((a_BCHW - b_BCHW) ** 2).mean(1)
    if region_BHW is None:
        region_BHW = torch.ones_like(err_BHW, dtype=torch.bool)
    mse_B = (err_BHW * region_BHW).sum((1, 2)) / region_BHW.sum((1, 2)).clamp(min=1)
    return scores.psnr(mse_B.clamp(min=1e-10), 1, data_range=2.0)


# -- checkpoints ----------------------------------------------------------------------------------------

class Checkpoint:
    """``OUT/ckpt``: models (safetensors), optimizer states (torch, weights only) and progress (json)."""

    def __init__(self, out: Path):
        self.dir = out / "ckpt"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, modules: dict, optimizers: dict, progress: dict):
        from safetensors.torch import save_file

        for name, m in modules.items():
            state = {k: v.detach().float().cpu().contiguous() for k, v in m.state_dict().items()}
            save_file(state, self.dir / f"{name}.safetensors.tmp")
            os.replace(self.dir / f"{name}.safetensors.tmp", self.dir / f"{name}.safetensors")
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), self.dir / f"{name}.pt.tmp")
            os.replace(self.dir / f"{name}.pt.tmp", self.dir / f"{name}.pt")
        (self.dir / "progress.json.tmp").write_text(json.dumps(progress, indent=1))
        os.replace(self.dir / "progress.json.tmp", self.dir / "progress.json")  # written last: the commit

    def progress(self) -> dict:
        path = self.dir / "progress.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def load(self, modules: dict, optimizers: dict):
        from safetensors.torch import load_file

        for name, m in modules.items():
            path = self.dir / f"{name}.safetensors"
            if path.is_file():
                m.load_state_dict(load_file(path))
        for name, opt in optimizers.items():
            path = self.dir / f"{name}.pt"
            if path.is_file():
                opt.load_state_dict(torch.load(path, weights_only=True))


class EMA:
    """Exponential moving average of a module's parameters (the weights that are shipped)."""

    def __init__(self, module, decay: float):
        self.decay = decay
        self.module = module
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.module.parameters()], 1 - self.decay)

    def state_module(self):
        """A copy of the module with the averaged weights."""
        import copy

        m = copy.deepcopy(self.module)
        with torch.no_grad():
            for p, s in zip(m.parameters(), self.shadow):
                p.copy_(s)
        return m


def lr_at(base: float, frac: float, step: int, warmup: int = 300) -> float:
    """Linear warm-up, then cosine decay to 10% over the phase's time budget."""
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


# -- the two phases -------------------------------------------------------------------------------------

def train_vae(cfg, vae, pool_images, ckpt, progress, deadline, device, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    if cfg.resume:
        ckpt.load({}, {"opt_vae": opt})
    budget = cfg.vae_minutes * 60
    step, spent = progress.get("vae_step", 0), progress.get("vae_seconds", 0.0)
    n = pool_images.shape[0]
    vae.train()
    t0, last_save = time.time(), time.time()
    while spent + (time.time() - t0) < budget and time.time() < deadline:
        frac = (spent + time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.vae_lr, frac, step)
        x_BCHW = to_pixels(pool_images[torch.randint(0, n, (cfg.vae_batch,), device=device)])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            posterior = vae.encode(x_BCHW).latent_dist
            rec_BCHW = vae.decode(posterior.sample()).sample.float()
        l1 = (rec_BCHW - x_BCHW).abs().mean()
        l2 = ((rec_BCHW - x_BCHW) ** 2).mean()
        kl = posterior.kl().mean() / x_BCHW[0].numel()
        loss = l1 + l2 + cfg.kl_weight * kl * x_BCHW[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log.append((step, spent + time.time() - t0, l1.item(), l2.item(), kl.item()))
        if time.time() - last_save > 60:
            progress.update(vae_step=step, vae_seconds=spent + time.time() - t0)
            ckpt.save({"vae": vae}, {"opt_vae": opt}, progress)
            last_save = time.time()
    progress.update(vae_step=step, vae_seconds=spent + time.time() - t0)
    progress["vae_done"] = progress["vae_seconds"] >= budget
    ckpt.save({"vae": vae}, {"opt_vae": opt}, progress)
    print(f"vae: {step} steps, {progress['vae_seconds']:.0f} s", flush=True)


@torch.no_grad()
def encode_pool(vae, pool_images, device, batch=2048):
    """Posterior means and standard deviations of the pool's latents (B x 4 x 16 x 16 each)."""
    vae.eval()
    means, stds = [], []
    for a in range(0, pool_images.shape[0], batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            dist = vae.encode(to_pixels(pool_images[a : a + batch])).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def train_unet(cfg, unet, text_encoder, scheduler, latents_mean, latents_std, ids_BL, empty_ids_L, ckpt, progress, deadline, device, log):
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    if cfg.resume:
        ckpt.load({"ema_unet": _ShadowView(ema_unet), "ema_text": _ShadowView(ema_text)}, {"opt_unet": opt})
    budget = cfg.unet_minutes * 60
    step, spent = progress.get("unet_step", 0), progress.get("unet_seconds", 0.0)
    first = step
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    snr_T = alphas_cumprod / (1 - alphas_cumprod)
    scale = progress["scaling_factor"]
    n = latents_mean.shape[0]
    unet.train()
    text_encoder.train()
    t0, last_save = time.time(), time.time()

    def save():
        progress.update(unet_step=step, unet_seconds=spent + time.time() - t0)
        ckpt.save(
            {"unet": unet, "text_encoder": text_encoder, "ema_unet": _ShadowView(ema_unet), "ema_text": _ShadowView(ema_text)},
            {"opt_unet": opt},
            progress,
        )

    while spent + (time.time() - t0) < budget and time.time() < deadline:
        frac = (spent + time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg.unet_lr, frac, step - first)
        idx_B = torch.randint(0, n, (cfg.unet_batch,), device=device)
        z0_BCHW = (latents_mean[idx_B] + latents_std[idx_B] * torch.randn_like(latents_mean[idx_B])) * scale
        ids = ids_BL[idx_B].clone()
        drop_B = torch.rand(cfg.unet_batch, device=device) < cfg.caption_dropout
        ids[drop_B] = empty_ids_L  # caption dropout: the unconditional model is the empty caption's
        t_B = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), device=device)
        eps_BCHW = torch.randn_like(z0_BCHW)
        a_B = alphas_cumprod[t_B].view(-1, 1, 1, 1)
        zt_BCHW = a_B.sqrt() * z0_BCHW + (1 - a_B).sqrt() * eps_BCHW  # q(z_t | z_0), DDPM eq. (4)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond_BLD = text_encoder(ids)[0]
            pred_BCHW = unet(zt_BCHW, t_B, encoder_hidden_states=cond_BLD).sample.float()
        weight_B = torch.clamp(snr_T[t_B], max=cfg.min_snr_gamma) / snr_T[t_B]  # Min-SNR-gamma for epsilon
        loss = (weight_B * ((pred_BCHW - eps_BCHW) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update()
        ema_text.update()
        step += 1
        if step % 50 == 0:
            log.append((step, spent + time.time() - t0, loss.item()))
        if time.time() - last_save > 60:
            save()
            last_save = time.time()
    save()
    progress["unet_done"] = progress["unet_seconds"] >= budget
    ckpt.save({}, {}, progress)
    print(f"unet: {step} steps, {progress['unet_seconds']:.0f} s", flush=True)
    return ema_unet, ema_text


class _ShadowView(torch.nn.Module):
    """Lets the checkpoint save and load an EMA's shadow tensors like a module's state."""

    def __init__(self, ema: EMA):
        super().__init__()
        self.ema = ema

    def state_dict(self, *args, **kwargs):
        return {f"{i}": s for i, s in enumerate(self.ema.shadow)}

    def load_state_dict(self, state, strict=True):
        with torch.no_grad():
            for i, s in enumerate(self.ema.shadow):
                s.copy_(state[f"{i}"])


# -- evaluation and export ------------------------------------------------------------------------------

@torch.no_grad()
def vae_psnr(vae, device, n: int, dtype=torch.float32) -> dict:
    """Encode-decode PSNR (dB) of held-out scenes (seed 0): whole image and background (outside all objects)."""
    images, _, bg = _scenes_chunk((0, 0, n))
    x_BCHW = to_pixels(torch.from_numpy(images).to(device))
    v = vae.to(dtype).eval()
    rec_BCHW = v.decode(v.encode(x_BCHW.to(dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    vae.float()
    # quantise to 8 bits as a saved image would be
    rec_BCHW = torch.round((rec_BCHW + 1) * 127.5) / 127.5 - 1
    bg_BHW = torch.from_numpy(bg).to(device)
    return {"psnr": psnr(rec_BCHW, x_BCHW).mean().item(), "psnr_bg": psnr(rec_BCHW, x_BCHW, bg_BHW).mean().item(), "n": n}


def export(out: Path, vae, text_encoder, unet, tokenizer, scheduler, dtype=torch.float16) -> Path:
    from .tiny import save_sd_folder

    folder = save_sd_folder(out / "model", vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, dtype=dtype)
    (folder / "diffedit.json").write_text(json.dumps(DIFFEDIT_DEFAULTS, indent=1) + "\n")
    return folder


def append_csv(path: Path, header: str, rows: list[tuple]):
    """Append a loss log's rows to a CSV (the header first, when the file is new): curves over resumed runs."""
    new = not path.is_file()
    with open(path, "a") as f:
        if new:
            f.write(header + "\n")
        f.writelines(",".join(f"{v:.6g}" for v in r) + "\n" for r in rows)


def start_run(out: str, minutes: float | None):
    """(start time, this invocation's deadline, the run folder, the device) of a training invocation."""
    start = time.time()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return start, start + (minutes * 60 if minutes else 1e12), folder, device


def write_curves(out: Path, vae_log: list, unet_log: list):
    for name, header, rows in [("loss_vae", "step,seconds,l1,l2,kl", vae_log), ("loss_unet", "step,seconds,loss", unet_log)]:
        append_csv(out / f"{name}.csv", header, rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name, col, label in [(axes[0], "loss_vae", 2, "VAE L1"), (axes[1], "loss_unet", 2, "UNet loss (Min-SNR eps MSE)")]:
        path = out / f"{name}.csv"
        data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2) if path.stat().st_size > 40 else np.zeros((0, 3))
        if len(data):
            ax.plot(data[:, 0], data[:, col])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)


def _copy_ema(module, path: Path):
    """Load an EMA checkpoint (tensors named by parameter order) into a module's parameters."""
    from safetensors.torch import load_file

    state = load_file(path)
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(state[f"{i}"])


def _unet_channels(value: str) -> tuple[int, int, int]:
    """``--unet-channels``: three block widths, each a multiple of the UNet's 32 norm groups."""
    try:
        channels = tuple(int(c) for c in value.split(","))
    except ValueError:
        channels = ()
    if len(channels) != 3 or any(c <= 0 or c % 32 for c in channels):
        raise argparse.ArgumentTypeError(f"{value!r}: three comma-separated multiples of 32, e.g. 128,192,256")
    return channels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffedit.shapes.train", description=__doc__.split("\n\n")[0])
    defaults = TrainConfig(out="")
    p.add_argument("--out", required=True, help="run folder: ckpt/, model/, loss curves, metrics.json")
    p.add_argument("--vae-minutes", type=float, default=defaults.vae_minutes, help="VAE training budget (minutes, over all invocations)")
    p.add_argument("--unet-minutes", type=float, default=defaults.unet_minutes, help="UNet + text encoder budget (minutes)")
    p.add_argument("--minutes", type=float, default=None, help="stop this invocation after this many minutes (checkpointed)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt")
    p.add_argument("--pool", type=int, default=defaults.pool, help="training scenes generated per invocation")
    p.add_argument("--seed", type=int, default=defaults.seed, help=f"training scene seed offset (seeds are {scenes.TRAIN_SEED_MIN:,} + this)")
    p.add_argument("--init", default=None, help="a saved model folder to train further (its VAE is kept as it is)")
    p.add_argument("--unet-channels", default=None, type=_unet_channels,
                   help="block widths of a fresh UNet, e.g. 128,192,256 (default 64,96,128); with --init, the saved "
                   "UNet is replaced by a fresh one of these widths and the VAE and text encoder are kept")
    p.add_argument("--unet-lr", type=float, default=defaults.unet_lr, help="peak learning rate of the UNet phase")
    p.add_argument("--pool-cache", default=None, help="folder to share the generated scenes with trainers running beside")
    p.add_argument("--unet-batch", type=int, default=defaults.unet_batch)
    p.add_argument("--vae-batch", type=int, default=defaults.vae_batch)
    p.add_argument("--workers", type=int, default=0, help="scene-generation processes (0: all CPUs)")
    p.add_argument("--eval-scenes", type=int, default=defaults.eval_scenes, help="held-out scenes for the VAE's PSNR")
    args = p.parse_args(argv)
    cfg = TrainConfig(
        out=args.out, vae_minutes=args.vae_minutes, unet_minutes=args.unet_minutes, minutes=args.minutes,
        resume=args.resume, pool=args.pool, seed=args.seed, unet_batch=args.unet_batch, vae_batch=args.vae_batch,
        workers=args.workers, eval_scenes=args.eval_scenes, init=args.init, unet_lr=args.unet_lr,
        pool_cache=args.pool_cache, unet_channels=args.unet_channels,
    )
    start, deadline, out, device = start_run(cfg.out, cfg.minutes)

    # 1. Tokenizer and models (fresh, or from the checkpoint)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        vae, text_encoder, unet, scheduler, tokenizer = load_init(cfg.init)
        if cfg.unet_channels:
            unet = build_unet(cfg.unet_channels)
    else:
        tokenizer = make_tokenizer(out / "tokenizer_src")
        vae, text_encoder, unet, scheduler = build_models(tokenizer, cfg.unet_channels or UNET_CHANNELS)
    ckpt = Checkpoint(out)
    progress = ckpt.progress() if cfg.resume else {}
    if cfg.init and not progress:  # the VAE is the saved one: straight to the UNet phase
        progress = {"vae_done": True, "scaling_factor": vae.config.scaling_factor, "init": cfg.init}
    if cfg.resume:
        ckpt.load({"vae": vae, "unet": unet, "text_encoder": text_encoder}, {})
        for module, name in [(unet, "unet"), (text_encoder, "text_encoder")]:  # a checkpoint kept small: EMA only
            if not (ckpt.dir / f"{name}.safetensors").is_file() and (ckpt.dir / f"ema_{name[:4]}.safetensors").is_file():
                _copy_ema(module, ckpt.dir / f"ema_{name[:4]}.safetensors")
    invocation = progress.get("invocations", 0)
    progress["invocations"] = invocation + 1
    progress["config"] = asdict(cfg)
    counts = {"vae": n_params(vae), "text_encoder": n_params(text_encoder), "unet": n_params(unet)}
    print("parameters:", counts, flush=True)
    vae.to(device)
    text_encoder.to(device)
    unet.to(device)

    # 2. Training scenes of this invocation (fresh seeds on every resume)
    t = time.time()
    seed = scenes.TRAIN_SEED_MIN + cfg.seed + invocation
    images, captions, _ = cached_pool(seed, cfg.pool, cfg.workers, cfg.pool_cache)
    pool_images = torch.from_numpy(images).to(device)
    print(f"pool: {len(captions)} scenes of seed {seed} in {time.time() - t:.1f} s", flush=True)

    # 3. The VAE
    vae_log, unet_log = [], []
    if not progress.get("vae_done"):
        vae.requires_grad_(True)
        train_vae(cfg, vae, pool_images, ckpt, progress, deadline, device, vae_log)
    if progress.get("vae_done") and "scaling_factor" not in progress:
        means, _ = encode_pool(vae, pool_images[:20000], device)
        progress["scaling_factor"] = float(1.0 / means.std())  # unit-variance latents, as SD's 0.18215
        progress["vae_psnr_fp32"] = vae_psnr(vae, device, cfg.eval_scenes)
        if device.type == "cuda":  # fp16 convolutions on a CPU take minutes
            progress["vae_psnr_fp16"] = vae_psnr(vae, device, cfg.eval_scenes, torch.float16)
        print("vae:", progress["vae_psnr_fp32"], progress.get("vae_psnr_fp16"), flush=True)
        ckpt.save({}, {}, progress)

    # 4. The UNet and text encoder on the frozen VAE's latents
    if progress.get("vae_done") and not progress.get("unet_done") and time.time() < deadline:
        vae.requires_grad_(False).eval()
        latents_mean, latents_std = encode_pool(vae, pool_images, device)
        del pool_images
        ids_BL = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        empty_L = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0].to(device)
        ema_unet, ema_text = train_unet(
            cfg, unet, text_encoder, scheduler, latents_mean, latents_std, ids_BL, empty_L, ckpt, progress, deadline, device, unet_log
        )
        unet, text_encoder = ema_unet.state_module(), ema_text.state_module()
    elif progress.get("unet_done"):
        _copy_ema(unet, ckpt.dir / "ema_unet.safetensors")
        _copy_ema(text_encoder, ckpt.dir / "ema_text.safetensors")

    # 5. Export the pipeline, curves and metrics
    write_curves(out, vae_log, unet_log)
    if progress.get("scaling_factor"):
        vae.register_to_config(scaling_factor=progress["scaling_factor"])
    folder = export(out, vae.float().cpu(), text_encoder.float().cpu(), unet.float().cpu(), tokenizer, scheduler)
    metrics = {k: v for k, v in progress.items() if k != "config"}
    metrics.update(parameters=counts, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", config=asdict(cfg))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(f"saved {folder} ({sum(f.stat().st_size for f in folder.rglob('*') if f.is_file()) / 1e6:.2f} MB) in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
