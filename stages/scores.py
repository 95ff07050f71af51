"""Edit quality scores for (source image, edited image, mask, source prompt, target prompt) pairs.

- ``clip_source`` / ``clip_target``: CLIP cosine similarity of the *edited* image with each prompt.
- ``clip_directional``: cosine between the change of image embedding and the change of text embedding,
  as InstructPix2Pix defines it (Brooks et al., CVPR 2023, Section 3.1 and its ``ClipSimilarity``):
  ``cos(E_img(edit) - E_img(source), E_txt(target) - E_txt(source))`` over L2-normalised embeddings.
  InstructPix2Pix kept pairs with directional >= 0.2 and image >= 0.7.
- ``clip_image``: CLIP cosine of the source and edited images.
- ``lpips``: LPIPS distance (Zhang et al., CVPR 2018) of source and edit, through the ``lpips`` package.
- ``psnr_bg`` / ``ssim_bg``: outside the mask (what DiffEdit promises to keep); ``psnr_fg`` / ``ssim_fg``
  inside it. SSIM is Wang et al. 2004's map (11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03, as
  scikit-image's ``gaussian_weights=True, use_sample_covariance=False``), averaged over the region's pixels.
- ``mask_fraction``: the share of pixels inside the mask.

A score is ``None`` (a null in the manifest) where it cannot be computed honestly: the CLIP columns when no
CLIP weights are there, ``lpips`` when the LPIPS backbone weights are not there (both with a reason in
:attr:`Scorer.unavailable`, which the job writes to ``run.json``), a region score for an empty region, and
``lpips`` for an image too small for the backbone. Never a score from random weights.

Plain PyTorch, no Ray: the job wraps :class:`Scorer` in its own actor. Shape legend: B pairs, D embedding
width, C channels, H x W image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import to_rgb
from .model import resolve_device

SHIPPED_CLIP = Path(__file__).resolve().parents[1] / "models" / "shapes-clip"
CLIP_COLUMNS = ("clip_source", "clip_target", "clip_directional", "clip_image")
LPIPS_COLUMNS = ("lpips",)
REGION_COLUMNS = ("psnr_bg", "ssim_bg", "psnr_fg", "ssim_fg", "mask_fraction")
SCORE_COLUMNS = CLIP_COLUMNS + LPIPS_COLUMNS + REGION_COLUMNS
# The torchvision weights the lpips package's backbones load (torchvision's own names in the hub cache).
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
LPIPS_MIN_SIDE = 32  # AlexNet's five pooling stages need at least 32 x 32 pixels; smaller images get a null.


class ScoreLoadError(ValueError):
    """A scoring model that was asked for explicitly and cannot be loaded, with the reason."""


@dataclass(frozen=True)
class ScoreConfig:
    """Which models score the edits. Defaults: the shipped shapes CLIP, LPIPS-Alex (the LPIPS paper's default)."""

    clip_model: str | None = None  # an open_clip architecture name ("ViT-B-32") or a model folder; None: the shapes CLIP
    clip_weights: str | None = None  # a .safetensors checkpoint for an architecture name (or a pretrained tag, with a hub)
    lpips_net: str = "alex"  # the LPIPS backbone: alex | vgg | squeeze
    lpips_weights: str | None = None  # the backbone's torchvision weights; None: torch hub's cache, if they are there
    device: str = "auto"
    batch_size: int = 32  # images per CLIP / LPIPS forward pass

    def __post_init__(self):
        if self.lpips_net not in LPIPS_BACKBONES:
            raise ValueError(f"`lpips_net` must be one of {', '.join(LPIPS_BACKBONES)} but is {self.lpips_net!r}.")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1 but is {self.batch_size}.")


# -- the scores, as functions of tensors -----------------------------------------------------------------


def cosine(a_BD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a_BD.float(), b_BD.float(), dim=-1)


def directional_similarity(
    source_image_BD: torch.Tensor, edit_image_BD: torch.Tensor, source_text_BD: torch.Tensor, target_text_BD: torch.Tensor
) -> torch.Tensor:
    """InstructPix2Pix's directional CLIP similarity: the embeddings are L2-normalised first, as in its
    ``ClipSimilarity``, then ``cos(img_edit - img_source, txt_target - txt_source)``."""
    n = lambda x: F.normalize(x.float(), dim=-1)  # noqa: E731
    return cosine(n(edit_image_BD) - n(source_image_BD), n(target_text_BD) - n(source_text_BD))


def region_psnr(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, region_BHW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR over the pixels (all channels) of ``region_BHW``: 10 log10(R^2 / MSE). NaN for an empty region,
    +inf for an identical one (as scikit-image's ``peak_signal_noise_ratio``)."""
    region_B1HW = region_BHW[:, None].to(a_BCHW.dtype)
    squared = (a_BCHW.double() - b_BCHW.double()) ** 2 * region_B1HW
    count_B = region_B1HW.sum(dim=(1, 2, 3)).double() * a_BCHW.shape[1]
    mse_B = squared.sum(dim=(1, 2, 3)) / count_B  # NaN where count is 0
    return 10 * torch.log10(data_range**2 / mse_B)


def _symmetric_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of scipy.ndimage's 'reflect' padding (d c b a | a b c d | d c b a), for any pad size."""
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_filter(x_NHW: torch.Tensor, sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """A separable Gaussian blur with scipy.ndimage.gaussian_filter's kernel and 'reflect' borders."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x_NHW.dtype, device=x_NHW.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    H, W = x_NHW.shape[-2:]
    x = x_NHW[:, None]
    x = x[:, :, _symmetric_index(H, radius, x.device)][:, :, :, _symmetric_index(W, radius, x.device)]
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x[:, 0]


def ssim_map(a_BCHW: torch.Tensor, b_BCHW: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """The SSIM map of Wang et al. 2004 (eq. 13), per pixel, averaged over channels: B x H x W.

    Local statistics under a Gaussian window (sigma 1.5, 11 taps); population (not sample) covariances;
    C1 = (0.01 R)^2, C2 = (0.03 R)^2. Equal to scikit-image's ``structural_similarity(..., full=True)`` map
    with ``gaussian_weights=True, use_sample_covariance=False``.
    """
    B, C, H, W = a_BCHW.shape
    x = a_BCHW.double().reshape(B * C, H, W)
    y = b_BCHW.double().reshape(B * C, H, W)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    stats = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y]), sigma)
    ux, uy, uxx, uyy, uxy = stats.chunk(5)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(B, C, H, W).mean(dim=1)


def region_mean(map_BHW: torch.Tensor, region_BHW: torch.Tensor) -> torch.Tensor:
    """Mean of a per-pixel map over a region, image by image; NaN for an empty region."""
    region = region_BHW.to(map_BHW.dtype)
    return (map_BHW * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2))


# -- loading the models ----------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess: object  # open_clip's inference transform: PIL -> C x S x S tensor
    tokenizer: object
    name: str
    weights: str  # the checkpoint file the weights came from (or the pretrained tag)


class _DropMessages(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


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


def load_clip(clip_model: str | None, clip_weights: str | None, device: torch.device) -> tuple[ClipBundle | None, str | None]:
    """Load a CLIP through open_clip, or return ``(None, reason)`` when the default one is not there.

    ``clip_model`` may be a folder holding either open_clip's hub layout (``open_clip_config.json`` with
    ``model_cfg``) or a raw model config JSON (registered with ``open_clip.add_model_config``), plus a
    ``.safetensors`` checkpoint; or an architecture name with ``clip_weights`` (a ``.safetensors`` file, or a
    pretrained tag where a hub is reachable). Asked-for models that cannot be loaded raise
    :class:`ScoreLoadError`; only the *default* model may be absent, which gives ``(None, reason)``.
    """
    import open_clip

    if clip_model is None:
        if clip_weights is not None:
            raise ScoreLoadError("`clip_weights` needs `clip_model` (an open_clip architecture name).")
        if not SHIPPED_CLIP.is_dir():
            return None, (
                f"no CLIP weights: the shipped shapes CLIP is not at {SHIPPED_CLIP}; pass clip_model "
                "(an open_clip architecture name or a model folder) and clip_weights"
            )
        clip_model = str(SHIPPED_CLIP)

    folder = Path(clip_model).expanduser()
    checkpoint, tag = None, None
    if folder.is_dir():
        checkpoint = Path(clip_weights).expanduser() if clip_weights else _safetensors_in(folder)
        if checkpoint is None:
            raise ScoreLoadError(f"CLIP folder {folder} holds no .safetensors weights (diffedit loads safetensors only).")
        if (folder / "open_clip_config.json").is_file():  # open_clip's hub layout
            name = "local-dir:" + str(folder.resolve())
        else:
            config = _model_config_in(folder)
            if config is None:
                raise ScoreLoadError(
                    f"CLIP folder {folder} has neither open_clip_config.json nor a model config JSON "
                    "(with embed_dim, vision_cfg and text_cfg)."
                )
            open_clip.add_model_config(config)  # registered under the file's stem
            name = config.stem
    else:
        name = clip_model
        if name.replace("/", "-") not in open_clip.list_models():
            raise ScoreLoadError(
                f"Unknown CLIP {clip_model!r}: neither a folder nor an open_clip architecture (open_clip.list_models())."
            )
        if clip_weights is None:
            raise ScoreLoadError(f"CLIP {clip_model!r} needs `clip_weights`: diffedit never scores with random weights.")
        looks_like_path = Path(clip_weights).suffix != "" or "/" in clip_weights
        if looks_like_path:
            checkpoint = Path(clip_weights).expanduser()
        else:
            tag = clip_weights  # a pretrained tag: open_clip downloads it (needs a reachable hub)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise ScoreLoadError(f"CLIP weights file {checkpoint} does not exist.")
        if checkpoint.suffix != ".safetensors":
            raise ScoreLoadError(
                f"CLIP weights {checkpoint} are not .safetensors; diffedit loads safetensors only, since unpickling "
                "can run arbitrary code (convert once with safetensors.torch.save_file from a trusted environment)."
            )
    # open_clip warns "initialized randomly" when it builds a model without weights; here the weights are
    # loaded right after, strictly, so the warning would only mislead a reader of the job's log.
    quiet = _DropMessages("initialized randomly")
    logging.getLogger().addFilter(quiet)
    try:
        # Built without weights, then loaded strictly from the one checkpoint chosen here: every tensor of
        # the model must come from it.
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, load_weights=tag is not None)
        if checkpoint is not None:
            open_clip.load_checkpoint(model, str(checkpoint), strict=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:  # open_clip raises RuntimeError, ValueError, OSError, KeyError ... for a bad checkpoint
        raise ScoreLoadError(f"Could not load CLIP {clip_model!r} with weights {checkpoint or tag}: {exc}") from exc
    finally:
        logging.getLogger().removeFilter(quiet)
    model.to(device).eval().requires_grad_(False)
    return ClipBundle(model, preprocess, tokenizer, name, str(checkpoint or tag)), None


def lpips_backbone_cache_file(net: str) -> Path:
    """Where torchvision's hub cache keeps the backbone weights the lpips package would download."""
    import torchvision

    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _load_backbone_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # torchvision's published backbones are .pth files; weights_only=True unpickles tensors and plain
    # containers only (no code), which is what makes reading the hub cache safe.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_lpips(net: str, weights: str | None, device: torch.device) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """LPIPS with the package's own linear layers and the backbone's torchvision weights, never a download.

    Returns ``(model, weights_file, None)``, or ``(None, None, reason)`` when no ``weights`` are given and
    torch hub's cache does not hold them. Explicit ``weights`` that cannot be loaded raise.
    """
    import lpips

    path = Path(weights).expanduser() if weights else lpips_backbone_cache_file(net)
    if not path.is_file():
        if weights:
            raise ScoreLoadError(f"LPIPS backbone weights file {path} does not exist.")
        return None, None, (
            f"no LPIPS backbone weights: {path.name} is not in torch hub's cache ({path.parent}) and no "
            f"lpips_weights was given; the lpips package would download them, which needs the network"
        )
    # pnet_rand=True builds the backbone without asking torchvision for weights (no download); the
    # package's linear layers (shipped with it, weights/v0.1/<net>.pth) load as usual.
    with warnings.catch_warnings():  # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = _load_backbone_state(path)
    # lpips splits torchvision's ``features`` into slices but keeps each layer's index: slice2.3 = features.3.
    mapped = {}
    for key in model.net.state_dict():
        slice_name, index, param = key.split(".", 2)
        source_key = f"features.{index}.{param}"
        if source_key not in state:
            raise ScoreLoadError(f"LPIPS backbone weights {path} lack {source_key}: not torchvision's {net} weights?")
        mapped[key] = state[source_key]
    try:
        model.net.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ScoreLoadError(f"LPIPS backbone weights {path} do not fit lpips' {net}: {exc}") from exc
    return model.to(device).eval().requires_grad_(False), str(path), None


# -- the scorer ------------------------------------------------------------------------------------------


def _as_rgb_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"Images must be PIL images or H x W x 3 uint8 arrays, got an array {a.shape} {a.dtype}.")
    return a


def _as_mask_array(mask) -> np.ndarray:
    if isinstance(mask, Image.Image):
        mask = mask.convert("L")
    a = np.asarray(mask)
    if a.ndim != 2:
        raise ValueError(f"Masks must be H x W (PIL 'L'/'1' or an array; nonzero = edited), got shape {a.shape}.")
    return a > 0


class Scorer:
    """Loads the scoring models once; :meth:`score` scores batches of edits.

    ``unavailable`` maps each score column that will be null to the reason (for ``run.json``).
    """

    def __init__(self, config: ScoreConfig | None = None):
        self.config = config or ScoreConfig()
        self.device = resolve_device(self.config.device)
        self.unavailable: dict[str, str] = {}
        self.clip, clip_reason = load_clip(self.config.clip_model, self.config.clip_weights, self.device)
        if clip_reason:
            self.unavailable.update({c: clip_reason for c in CLIP_COLUMNS})
        self.lpips, self.lpips_weights, lpips_reason = load_lpips(self.config.lpips_net, self.config.lpips_weights, self.device)
        if lpips_reason:
            self.unavailable["lpips"] = lpips_reason
        self._fingerprints: dict[str, str] = {}

    def describe(self) -> dict:
        """What scored the edits, for ``run.json``: models, weight files and their sha256, and the reasons for nulls."""
        def file_info(path):
            if path is None or not Path(path).is_file():
                return {"weights": path}
            if path not in self._fingerprints:
                self._fingerprints[path] = sha256_file(path)
            return {"weights": str(path), "sha256": self._fingerprints[path]}

        return {
            "clip": None if self.clip is None else {"model": self.clip.name, **file_info(self.clip.weights)},
            "lpips": None if self.lpips is None else {"net": self.config.lpips_net, "version": "0.1", **file_info(self.lpips_weights)},
            "ssim": {"window": "gaussian", "sigma": 1.5, "truncate": 3.5, "k1": 0.01, "k2": 0.03, "data_range": 1.0},
            "unavailable": dict(self.unavailable),
        }

    @torch.no_grad()
    def clip_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        """images (H x W x 3 uint8, any sizes) -> L2-normalised image embeddings B x D, through open_clip's own
        inference transform."""
        out = []
        bs = self.config.batch_size
        for i in range(0, len(images), bs):
            x = torch.stack([self.clip.preprocess(Image.fromarray(a)) for a in images[i : i + bs]]).to(self.device)
            out.append(self.clip.model.encode_image(x, normalize=True).float())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """prompts -> L2-normalised text embeddings B x D; each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        out = []
        bs = self.config.batch_size
        for i in range(0, len(unique), bs):
            tokens = self.clip.tokenizer(unique[i : i + bs]).to(self.device)
            out.append(self.clip.model.encode_text(tokens, normalize=True).float())
        embeds = torch.cat(out)
        index = {p: i for i, p in enumerate(unique)}
        return embeds[[index[p] for p in prompts]]

    @torch.no_grad()
    def score(self, sources: list, edits: list, masks: list, source_prompts: list[str], target_prompts: list[str]) -> dict[str, list]:
        """Score B edits. Images: PIL or H x W x 3 uint8 arrays; ``edits[i]`` and ``masks[i]`` at the size of
        ``sources[i]`` (sizes may differ between pairs). Returns ``{column: [float or None] * B}`` for every
        column of :data:`SCORE_COLUMNS`."""
        B = len(sources)
        if not (len(edits) == len(masks) == len(source_prompts) == len(target_prompts) == B):
            raise ValueError(
                f"Got {B} sources, {len(edits)} edits, {len(masks)} masks, {len(source_prompts)} source prompts and "
                f"{len(target_prompts)} target prompts; they must be equal."
            )
        src = [_as_rgb_array(s) for s in sources]
        edt = [_as_rgb_array(e) for e in edits]
        msk = [_as_mask_array(m) for m in masks]
        for i, (s, e, m) in enumerate(zip(src, edt, msk)):
            if s.shape != e.shape or s.shape[:2] != m.shape:
                raise ValueError(f"Pair {i}: source {s.shape[:2]}, edit {e.shape[:2]} and mask {m.shape} must have one size.")
        out: dict[str, list] = {c: [None] * B for c in SCORE_COLUMNS}
        if B == 0:
            return out

        # 1. CLIP: image and text embeddings, then the four similarities.
        if self.clip is not None:
            src_img, edt_img = self.clip_embeddings(src + edt).chunk(2)
            src_txt, tgt_txt = self.text_embeddings(list(source_prompts) + list(target_prompts)).chunk(2)
            columns = {
                "clip_source": cosine(edt_img, src_txt),
                "clip_target": cosine(edt_img, tgt_txt),
                "clip_directional": directional_similarity(src_img, edt_img, src_txt, tgt_txt),
                "clip_image": cosine(src_img, edt_img),
            }
            for name, values in columns.items():
                out[name] = [float(v) for v in values.cpu()]

        # 2. Pixel scores, on groups of same-size pairs, in [0, 1] (LPIPS takes [-1, 1]).
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(src):
            groups.setdefault(s.shape, []).append(i)
        bs = self.config.batch_size
        for shape, members in groups.items():
            for j in range(0, len(members), bs):
                idx = members[j : j + bs]
                # float64 for PSNR / SSIM (scikit-image's precision); LPIPS runs in float32.
                a = torch.from_numpy(np.stack([src[i] for i in idx])).to(self.device).permute(0, 3, 1, 2).double() / 255
                b = torch.from_numpy(np.stack([edt[i] for i in idx])).to(self.device).permute(0, 3, 1, 2).double() / 255
                fg = torch.from_numpy(np.stack([msk[i] for i in idx])).to(self.device)
                ssim = ssim_map(a, b)
                values = {
                    "psnr_bg": region_psnr(a, b, ~fg),
                    "ssim_bg": region_mean(ssim, ~fg),
                    "psnr_fg": region_psnr(a, b, fg),
                    "ssim_fg": region_mean(ssim, fg),
                    "mask_fraction": fg.double().mean(dim=(1, 2)),
                }
                if self.lpips is not None and min(shape[:2]) >= LPIPS_MIN_SIDE:
                    values["lpips"] = self.lpips(a.float() * 2 - 1, b.float() * 2 - 1).flatten()
                for name, column in values.items():
                    for i, v in zip(idx, column.cpu().tolist()):
                        out[name][i] = None if math.isnan(v) else float(v)
        return out
