"""Where a model and the scorers load from, found and described from their files alone, without importing torch.

The job's driver (pipelines/job.py) plans a run with these: a model folder is checked and fingerprinted, the
scorers' weight files are found and hashed, and run.json says which scores will be null and why, while no
weights are loaded and no network is built, so a head node without a GPU holds no model. The loaders
(stages/model.py: load_model, stages/scores.py: Scorer) start from the same functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..manifests.schema import SCORE_COLUMNS
from .config import LPIPS_BACKBONES, ScoreConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "models" / "shapes-ldm"
SHIPPED_CLIP = ROOT / "models" / "shapes-clip"
UNET_WEIGHTS = TRANSFORMER_WEIGHTS = VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
ENCODER_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class FamilySpec:
    """What a model family's folder holds and what its edits default to, from its files alone (no torch).
    stages/families.py holds the code that runs each family."""

    description: str
    denoiser: str  # the folder of the network the steps call: "unet" or "transformer"
    components: dict  # folder -> the weights file it must hold, or None for a config-only component
    optional: tuple = ()  # components a model_index.json may set to null (SD3's T5 encoder)
    schedule: str = "ddim"  # "ddim": a diffusion model (DDPM timesteps); "flow": a rectified-flow one (sigmas)
    defaults: dict = field(default_factory=dict)  # edit parameters (flat keys) under the model's diffedit.json


FAMILIES = {
    "sd": FamilySpec(
        "Stable Diffusion 1.x/2.x (a UNet, one CLIP text encoder; epsilon or v-prediction)", "unet",
        {"unet": UNET_WEIGHTS, "vae": VAE_WEIGHTS, "text_encoder": ENCODER_WEIGHTS, "tokenizer": None,
         "scheduler": None}),
    "sdxl": FamilySpec(
        "Stable Diffusion XL (a UNet, two CLIP text encoders, pooled text and size conditioning)", "unet",
        {"unet": UNET_WEIGHTS, "vae": VAE_WEIGHTS, "text_encoder": ENCODER_WEIGHTS, "text_encoder_2": ENCODER_WEIGHTS,
         "tokenizer": None, "tokenizer_2": None, "scheduler": None},
        defaults={"guidance": 5.0}),  # StableDiffusionXLPipeline's default guidance
    "sd3": FamilySpec(
        "Stable Diffusion 3.x (a rectified-flow transformer, two CLIP encoders and an optional T5)", "transformer",
        {"transformer": TRANSFORMER_WEIGHTS, "vae": VAE_WEIGHTS, "text_encoder": ENCODER_WEIGHTS,
         "text_encoder_2": ENCODER_WEIGHTS, "text_encoder_3": ENCODER_WEIGHTS, "tokenizer": None, "tokenizer_2": None,
         "tokenizer_3": None, "scheduler": None},
        optional=("text_encoder_3", "tokenizer_3"), schedule="flow", defaults={"steps": 28, "guidance": 7.0}),  # the SD3 pipelines'
    "flux": FamilySpec(
        "FLUX.1 (a rectified-flow transformer, CLIP and T5 encoders; dev's guidance embedding or schnell's none)",
        "transformer",
        {"transformer": TRANSFORMER_WEIGHTS, "vae": VAE_WEIGHTS, "text_encoder": ENCODER_WEIGHTS,
         "text_encoder_2": ENCODER_WEIGHTS, "tokenizer": None, "tokenizer_2": None, "scheduler": None},
        schedule="flow", defaults={"steps": 28, "guidance": 3.5}),  # FluxPipeline's (dev); schnell: see family_defaults
}
SUPPORTED_FAMILIES = {name: spec.description for name, spec in FAMILIES.items()}
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
FINGERPRINTED_SUFFIXES = (".safetensors", ".json", ".txt")  # the files describe_model hashes
RECOMMENDED_DEFAULTS_FILE = "diffedit.json"  # optional: a model's own recommended edit parameters
CLIP_COLUMNS = tuple(c for c in SCORE_COLUMNS if c.startswith("clip_"))  # null together when no CLIP is there
# Images longer than 4:1 reach open_clip's transform already cut to what it keeps (stages/scores.py: clip_ready): its
# resize of the short side to S would otherwise cost S x S x aspect pixels. Up to 4:1 (panoramas) nothing changes.
CLIP_MAX_ASPECT = 4


# -- the model ----------------------------------------------------------------------------------------------


class ModelLoadError(ValueError):
    """A model folder or hub id that cannot be loaded, with the reason."""


KNOWN_FAMILIES = {"sdxl-refiner": "the Stable Diffusion XL refiner (one text encoder, aesthetic-score conditioning)",
                  "inpaint": "an inpainting model (its denoiser takes the mask and the masked image as extra input "
                             "channels; DiffEdit needs the base model)",
                  "transformer": "a transformer-based pipeline"}


def model_family(index: dict) -> str:
    """The family of a diffusers model from its model_index.json: its pipeline class, else its components."""
    name, parts = str(index.get("_class_name", "")), set(index)
    if "Inpaint" in name:
        return "inpaint"
    if name.startswith("StableDiffusionXL") or {"unet", "text_encoder_2"} <= parts:
        return "sdxl-refiner" if index.get("requires_aesthetics_score") or _null(index.get("text_encoder")) else "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if "transformer" in parts:
        return "transformer"
    if {"unet", "text_encoder"} <= parts or name.startswith("StableDiffusion"):
        return "sd"
    return name or "unknown"


def _null(entry) -> bool:
    """A model_index.json entry that names no component: null, or [null, null]."""
    return entry is None or (isinstance(entry, list) and all(e is None for e in entry))


def check_family(index: dict, where: str) -> str:
    """The model's family, or a ModelLoadError naming it and the families the engine supports."""
    family = model_family(index)
    if family not in FAMILIES:
        what = KNOWN_FAMILIES.get(family, f"pipeline class {family!r}")
        supported = "; ".join(SUPPORTED_FAMILIES.values())
        raise ModelLoadError(f"{where} is {what}, which diffedit does not run; supported: {supported}.")
    return family


def family_components(family: str, index: dict) -> dict:
    """The components (folder -> weights file or None) this model's folder must hold: its family's, less the
    optional ones its model_index.json sets to null."""
    spec = FAMILIES[family]
    return {k: v for k, v in spec.components.items() if not (k in spec.optional and _null(index.get(k)))}


def family_defaults(family: str, denoiser_config: dict) -> dict:
    """A family's edit defaults (flat keys) for one model: FLUX.1 schnell (no guidance embedding) takes 4 steps
    and no guidance, as its pipeline does."""
    if family == "flux" and not denoiser_config.get("guidance_embeds", False):
        return {"steps": 4, "guidance": 1.0}
    return dict(FAMILIES[family].defaults)


def _read_index(path: Path) -> dict:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Model folder {path}: model_index.json cannot be read: {exc}") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"Model folder {path}: model_index.json holds no JSON object.")
    return index


def check_model_folder(path: Path) -> str:
    """The folder's family; a ModelLoadError for a family the engine does not run, an incomplete folder or one
    that holds only pickled weights, naming what is wrong."""
    if not path.is_dir():
        raise ModelLoadError(f"Model folder {path} does not exist.")
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"Model folder {path} is incomplete: missing model_index.json.")
    index = _read_index(path)
    family = check_family(index, f"Model folder {path}")
    problems = []
    for folder, weights in family_components(family, index).items():
        problems += _component_problems(path / folder, folder, weights)
    if problems:
        raise ModelLoadError(f"Model folder {path} is incomplete: missing {', '.join(problems)}.")
    return family


def _component_problems(sub: Path, folder: str, weights: str | None) -> list[str]:
    """What one component folder lacks (empty if nothing); a ModelLoadError if it holds only pickled weights."""
    if not sub.is_dir():
        return [f"{folder}/"]
    if folder == "scheduler":
        return [] if (sub / "scheduler_config.json").is_file() else ["scheduler/scheduler_config.json"]
    if weights is None:
        return []
    problems = [] if (sub / "config.json").is_file() else [f"{folder}/config.json"]
    if not any(sub.glob("*.safetensors")):  # one file, or shards with their index
        pickled = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLED_SUFFIXES)
        if pickled:
            raise ModelLoadError(
                f"{sub} holds only pickled weights ({', '.join(pickled)}); diffedit loads safetensors only, "
                "since unpickling can run arbitrary code. Convert them once with diffusers "
                "(`pipe.save_pretrained(dir, safe_serialization=True)`) from a trusted environment."
            )
        problems.append(f"{folder}/{weights}")
    return problems


def is_hub_id(model: str | Path) -> bool:
    """Whether ``model`` names a hub repository ("org/name") rather than a local folder."""
    text = str(model)
    return not (Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") != 1)


def describe_model(model: str | Path) -> dict:
    """What the job's driver needs without loading weights: the family, resolution and size multiple, the
    recommended edit defaults (the family's, then the folder's diffedit.json over them), the fingerprint.

    The fingerprint is a sha256 over the model's weight and config files (FINGERPRINTED_SUFFIXES): over their
    bytes for a local folder (fast even at SD scale); over the hub's own hashes of them for a hub id, which
    downloads model_index.json (the family) and the two configs that give the resolution, and nothing else.
    """
    if is_hub_id(model):
        return _describe_hub_model(str(model))
    path = Path(model).expanduser()
    family = check_model_folder(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FINGERPRINTED_SUFFIXES):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    config = lambda name: json.loads((path / name).read_text())  # noqa: E731
    recommended_file = path / RECOMMENDED_DEFAULTS_FILE
    own = json.loads(recommended_file.read_text()) if recommended_file.is_file() else {}
    facts = _family_facts(family, config)
    return dict(source=str(path.resolve()), **facts, recommended={**facts["family_defaults"], **own},
                fingerprint=h.hexdigest())


def _family_facts(family: str, config) -> dict:
    """family, resolution, size_multiple and the family's edit defaults, from ``config(name) -> dict``."""
    denoiser = config(f"{FAMILIES[family].denoiser}/config.json")
    return dict(family=family, **model_geometry(family, denoiser, config("vae/config.json")),
                family_defaults=family_defaults(family, denoiser))


def _describe_hub_model(repo_id: str) -> dict:
    """describe_model for a hub id: the hub's sha256 of each weight file (git id of each other file), at one revision.
    No diffedit.json: load_model reads it from local folders only."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
        config = lambda name: json.loads(Path(hf_hub_download(repo_id, name, revision=info.sha)).read_text())  # noqa: E731
        family = check_family(config("model_index.json"), f"Model {repo_id}")
        facts = _family_facts(family, config)
    except (OSError, ValueError) as exc:  # the hub's HTTP, offline-mode and invalid-id errors
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"Could not describe the model hub id {repo_id!r}: {exc} (no local folder {repo_id} "
                             "exists, and a hub id needs network access).") from exc
    h = hashlib.sha256()
    for f in sorted(info.siblings, key=lambda f: f.rfilename):
        if Path(f.rfilename).suffix in FINGERPRINTED_SUFFIXES:
            h.update(f"{f.rfilename}:{f.lfs.sha256 if f.lfs else f.blob_id}".encode())
    return dict(source=repo_id, **facts, recommended=dict(facts["family_defaults"]), fingerprint=h.hexdigest())


FLUX_SAMPLE_SIZE = 128  # FluxPipeline's default_sample_size (latent pixels): 1024 px with FLUX's 8x VAE


def model_geometry(family: str, denoiser_config: dict, vae_config: dict) -> dict:
    """The denoiser's training image size and what each side of an edit size must be a multiple of (the VAE's
    factor times the UNet's downsampling or the transformer's patch), from the configs alone (as
    :attr:`DiffEditModel.resolution` and :attr:`DiffEditModel.size_multiple`)."""
    vae_factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    if FAMILIES[family].denoiser == "unet":
        down, latent = 2 ** (len(denoiser_config.get("block_out_channels", [0] * 4)) - 1), denoiser_config.get("sample_size", 64)
    elif family == "sd3":
        down, latent = denoiser_config.get("patch_size", 2), denoiser_config.get("sample_size", 128)
    else:  # FLUX packs 2 x 2 latents into a token
        down, latent = 2, FLUX_SAMPLE_SIZE
    return dict(resolution=int(latent) * vae_factor, size_multiple=vae_factor * int(down))


# -- the scorers -------------------------------------------------------------------------------------------------


class ScoreLoadError(ValueError):
    """A scoring model that was asked for explicitly and cannot be loaded, with the reason."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safetensors_in(folder: Path) -> Path | None:
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors"]
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors"))
    return found[0] if found else None


def _model_config_in(folder: Path) -> Path | None:
    """A raw open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) among the folder's JSON files."""
    for path in sorted(folder.glob("*.json")):
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            return path
    return None


@dataclass(frozen=True)
class ClipSource:
    """The CLIP a :class:`ScoreConfig` names, found from names and files alone (nothing is loaded)."""

    name: str  # open_clip's model name: "local-dir:<folder>", a raw config's file stem, or an architecture
    checkpoint: Path | None  # the .safetensors file the weights come from; None with a pretrained tag
    tag: str | None = None  # an open_clip pretrained tag (downloaded: needs a reachable hub)
    config: Path | None = None  # a raw model config JSON, registered with open_clip before building

    @property
    def weights(self) -> str:
        return str(self.checkpoint or self.tag)


def resolve_clip(clip_model: str | None, clip_weights: str | None) -> tuple[ClipSource | None, str | None]:
    """Which CLIP to load, or ``(None, reason)`` when the default one is not there.

    ``clip_model`` may be a folder holding either open_clip's hub layout (``open_clip_config.json`` with
    ``model_cfg``) or a raw model config JSON, plus a ``.safetensors`` checkpoint; or an architecture name with
    ``clip_weights`` (a ``.safetensors`` file, or a pretrained tag where a hub is reachable); None: the shipped
    shapes CLIP. Asked-for models that cannot be found raise :class:`ScoreLoadError`; only the *default* model
    may be absent.
    """
    installed = importlib.util.find_spec("open_clip") is not None
    if clip_model is None:
        if clip_weights is not None:
            raise ScoreLoadError("`clip_weights` needs `clip_model` (an open_clip architecture name).")
        if not SHIPPED_CLIP.is_dir():
            return None, (
                f"no CLIP weights: the shipped shapes CLIP is not at {SHIPPED_CLIP}; pass clip_model "
                "(an open_clip architecture name or a model folder) and clip_weights"
            )
        if not installed:
            return None, "no CLIP: the open_clip package (open-clip-torch) is not installed"
        clip_model = str(SHIPPED_CLIP)
    elif not installed:
        raise ScoreLoadError(f"CLIP {clip_model!r} needs the open_clip package (open-clip-torch), which is not installed.")
    folder = Path(clip_model).expanduser()
    source = _clip_in_folder(folder, clip_weights) if folder.is_dir() else _clip_by_name(clip_model, clip_weights)
    if source.checkpoint is not None:
        if not source.checkpoint.is_file():
            raise ScoreLoadError(f"CLIP weights file {source.checkpoint} does not exist.")
        if source.checkpoint.suffix != ".safetensors":
            raise ScoreLoadError(
                f"CLIP weights {source.checkpoint} are not .safetensors; diffedit loads safetensors only, since "
                "unpickling can run arbitrary code (convert once with safetensors.torch.save_file from a trusted "
                "environment)."
            )
    return source, None


def _clip_in_folder(folder: Path, clip_weights: str | None) -> ClipSource:
    checkpoint = Path(clip_weights).expanduser() if clip_weights else _safetensors_in(folder)
    if checkpoint is None:
        raise ScoreLoadError(f"CLIP folder {folder} holds no .safetensors weights (diffedit loads safetensors only).")
    if (folder / "open_clip_config.json").is_file():  # open_clip's hub layout
        return ClipSource("local-dir:" + str(folder.resolve()), checkpoint)
    config = _model_config_in(folder)
    if config is None:
        raise ScoreLoadError(
            f"CLIP folder {folder} has neither open_clip_config.json nor a model config JSON "
            "(with embed_dim, vision_cfg and text_cfg)."
        )
    return ClipSource(config.stem, checkpoint, config=config)


def _clip_by_name(name: str, clip_weights: str | None) -> ClipSource:
    import open_clip  # its list of architectures: configs only

    if name.replace("/", "-") not in open_clip.list_models():
        raise ScoreLoadError(
            f"Unknown CLIP {name!r}: neither a folder nor an open_clip architecture (open_clip.list_models())."
        )
    if clip_weights is None:
        raise ScoreLoadError(f"CLIP {name!r} needs `clip_weights`: diffedit never scores with random weights.")
    if Path(clip_weights).suffix != "" or "/" in clip_weights:  # a file
        return ClipSource(name, Path(clip_weights).expanduser())
    return ClipSource(name, None, tag=clip_weights)


def lpips_backbone_cache_file(net: str) -> Path:
    """Where torch hub's cache keeps the backbone weights the lpips package would download (torch.hub.get_dir(),
    found without importing torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub)."""
    home = os.getenv("TORCH_HOME") or os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub" / "checkpoints" / LPIPS_BACKBONES[net]


def resolve_lpips(net: str, weights: str | None) -> tuple[Path | None, str | None]:
    """The backbone weights file LPIPS would load (``weights``, else torch hub's cache), found without loading it.

    ``(None, reason)`` when no ``weights`` are given and the cache does not hold them, or the lpips package is not
    installed. Explicit ``weights`` that are not there raise :class:`ScoreLoadError`.
    """
    path = Path(weights).expanduser() if weights else lpips_backbone_cache_file(net)
    if weights and not path.is_file():
        raise ScoreLoadError(f"LPIPS backbone weights file {path} does not exist.")
    if weights and not _weights_file(path):
        raise ScoreLoadError(f"LPIPS backbone weights file {path} is neither a PyTorch checkpoint nor safetensors.")
    if importlib.util.find_spec("lpips") is None:
        if weights:
            raise ScoreLoadError(f"lpips_weights {path} was given, but the lpips package is not installed.")
        return None, "the lpips package is not installed"
    if not path.is_file():
        return None, (
            f"no LPIPS backbone weights: {path.name} is not in torch hub's cache ({path.parent}) and no "
            f"lpips_weights was given; the lpips package would download them, which needs the network"
        )
    return path, None


def _weights_file(path: Path) -> bool:
    """Whether a file starts as a weights file can: safetensors (an 8-byte header length, then a JSON header), or a
    PyTorch checkpoint (a zip archive, or the legacy format's pickle). Read from its first bytes, nothing loaded."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors":
        return len(head) == 9 and head[8:9] == b"{"
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # zip (torch >= 1.6), pickle protocol 2+ (legacy)


def _unavailable(clip_reason: str | None, lpips_reason: str | None) -> dict[str, str]:
    """The score columns that will be null, each with the reason."""
    out = {c: clip_reason for c in CLIP_COLUMNS} if clip_reason else {}
    return {**out, "lpips": lpips_reason} if lpips_reason else out


def _description(config: ScoreConfig, clip, lpips_weights: str | None,
                 unavailable: dict[str, str], sha256) -> dict:
    """``Scorer.describe()``'s record: models, weight files and their ``sha256(path)``, and the reasons for nulls.
    ``clip`` is a :class:`ClipSource` or a loaded CLIP (both have ``name`` and ``weights``), or None."""
    def file_info(path):
        if path is None or not Path(path).is_file():
            return {"weights": path}
        return {"weights": str(path), "sha256": sha256(str(path))}

    return {
        "clip": None if clip is None else {"model": clip.name, **file_info(clip.weights)},
        "lpips": None if lpips_weights is None else {"net": config.lpips_net, "version": "0.1", **file_info(lpips_weights)},
        "ssim": {"window": "gaussian", "sigma": 1.5, "truncate": 3.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0},
        # Where the scores look: PSNR at full size; SSIM / LPIPS within max_pixels; CLIP a centre crop.
        "limits": {"max_pixels": config.max_pixels, "resize": "box", "clip_max_aspect": CLIP_MAX_ASPECT},
        "unavailable": dict(unavailable),
    }


def describe_scores(config: ScoreConfig) -> dict:
    """What ``Scorer(config).describe()`` says, found from names and files alone: no network is built and no weights
    are read but to hash them, so the job's driver can say which scores the job will have, and why not.

    Raises as ``Scorer(config)`` does for a model asked for that is not there. Only a checkpoint that is there but
    does not fit its model is left to the Scorer, which must load it to know.
    """
    clip, clip_reason = resolve_clip(config.clip_model, config.clip_weights)
    lpips_file, lpips_reason = resolve_lpips(config.lpips_net, config.lpips_weights)
    unavailable = _unavailable(clip_reason, lpips_reason)
    return _description(config, clip, None if lpips_file is None else str(lpips_file), unavailable, sha256_file)
