"""Train a small CLIP on the shapes world, contrastively, with open_clip and a custom model config.

The config (``CLIP_CONFIG``) is a small ViT for 64x64 images (8x8 patches) and a small text transformer
over the world's own BPE tokenizer (written by ``diffedit.shapes.tiny.write_clip_tokenizer``, as the LDM's).
Images go through open_clip's own inference normalisation, so ``open_clip.create_model_and_transforms``
plus ``open_clip.get_tokenizer`` reproduce training-time inputs. Scenes sharing a caption are all
positives of each other (soft targets), since one-object captions repeat within a large batch.

The result, ``OUT/shapes-clip/``, in open_clip's hub layout: ``open_clip_config.json`` (``model_cfg``,
``preprocess_cfg``), the tokenizer files and ``open_clip_model.safetensors`` (fp16); open_clip loads it as
``local-dir:OUT/shapes-clip``. Training scenes use seeds >= TRAIN_SEED_MIN + 500.

    python -m diffedit.shapes.train_clip --out runs/clip --minutes 4 [--resume]

Tensor names carry their shapes: B batch, D embedding.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffedit.shapes import scenes
from diffedit.shapes.train import append_csv, generate_pool, lr_at

NAME = "shapes-clip"
CONTEXT_LENGTH = 32
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": scenes.SIZE, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    # The world's own BPE tokenizer (every word of it one token; the same writer as the LDM's): a token
    # table of ~600 rows instead of open_clip's 49,408 keeps the shipped weights small. open_clip loads it
    # from the model folder (the `local-dir:` layout); vocab_size is filled in by `build`.
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": None, "width": 64, "heads": 4, "layers": 3,
                 "hf_tokenizer_name": NAME},
}


def write_folder(folder: Path) -> Path:
    """The model folder in open_clip's hub layout, without weights: open_clip_config.json and the tokenizer."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPTokenizer

    from diffedit.shapes.tiny import write_clip_tokenizer

    write_clip_tokenizer(folder, scenes.WORDS, model_max_length=CONTEXT_LENGTH)
    config = json.loads(json.dumps(CLIP_CONFIG))
    config["text_cfg"]["vocab_size"] = len(CLIPTokenizer.from_pretrained(folder))
    preprocess = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}  # as `normalise` below
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=1) + "\n"
    )
    return folder


def build(folder: Path):
    import open_clip

    name = "local-dir:" + str(write_folder(folder).resolve())
    model, _, preprocess = open_clip.create_model_and_transforms(name, load_weights=False)
    return model, preprocess, open_clip.get_tokenizer(name)


def normalise(images_BHWC: torch.Tensor) -> torch.Tensor:
    """uint8 images -> open_clip's normalised inputs (ToTensor + Normalize with OpenAI's mean and std)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = torch.tensor(OPENAI_DATASET_MEAN, device=images_BHWC.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, device=images_BHWC.device).view(1, 3, 1, 1)
    return (images_BHWC.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffedit.shapes.train_clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, loss_clip.csv, shapes-clip/")
    p.add_argument("--minutes", type=float, default=4.0, help="training time of this invocation")
    p.add_argument("--total-minutes", type=float, default=None, help="learning-rate schedule length (default: --minutes)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--pool", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)

    # 1. Model, tokenizer, optimizer (fresh or resumed)
    model, _, tokenizer = build(out / NAME)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    progress = {"step": 0, "seconds": 0.0, "invocations": 0}
    ckpt = out / "ckpt_clip.pt"
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        progress = state["progress"]
    print("parameters:", sum(p.numel() for p in model.parameters()), flush=True)

    # 2. Scenes: images and tokenized captions
    seed = scenes.TRAIN_SEED_MIN + 500 + progress["invocations"]
    progress["invocations"] += 1
    t = time.time()
    images, captions, _ = generate_pool(seed, args.pool, args.workers)
    images = torch.from_numpy(images).to(device)
    unique = sorted(set(captions))
    caption_id = torch.tensor(_index(captions, unique), device=device)
    tokens_UL = tokenizer(unique).to(device)
    print(f"pool: {len(captions)} scenes, {len(unique)} captions, {time.time() - t:.1f} s", flush=True)

    # 3. Contrastive training (soft targets: every scene with the same caption is a positive)
    budget = (args.total_minutes or args.minutes) * 60
    t0 = time.time()
    step, spent = progress["step"], progress["seconds"]
    log = []
    loss = torch.tensor(float("nan"))
    model.train()
    while time.time() - t0 < args.minutes * 60:
        for g in opt.param_groups:
            g["lr"] = lr_at(args.lr, (spent + time.time() - t0) / budget, step, warmup=200)
        idx_B = torch.randint(0, images.shape[0], (args.batch,), device=device)
        cid_B = caption_id[idx_B]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            img_BD, txt_BD, logit_scale = model(normalise(images[idx_B]), tokens_UL[cid_B])
        logits_BB = logit_scale * img_BD.float() @ txt_BD.float().T
        same_BB = (cid_B[:, None] == cid_B[None, :]).float()
        target_BB = same_BB / same_BB.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits_BB, target_BB) + F.cross_entropy(logits_BB.T, target_BB)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 20 == 0:
            log.append((step, spent + time.time() - t0, loss.item()))
    progress.update(step=step, seconds=spent + time.time() - t0)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "progress": progress}, ckpt)
    print(f"clip: {step} steps, {progress['seconds']:.0f} s, last loss {loss.item():.4f}", flush=True)

    # 4. Export (fp16 safetensors) and the loss curve
    from safetensors.torch import save_file

    state = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / NAME / "open_clip_model.safetensors")
    append_csv(out / "loss_clip.csv", "step,seconds,loss", log)
    (out / "clip_metrics.json").write_text(json.dumps({**progress, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}) + "\n")
    return 0


def _index(captions, unique):
    lookup = {c: i for i, c in enumerate(unique)}
    return [lookup[c] for c in captions]


if __name__ == "__main__":
    raise SystemExit(main())
