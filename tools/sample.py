"""Text-to-image with SD v1 weights, as CompVis `scripts/txt2img.py` does it.

    python -m tools.sample CKPT --prompt "a red bus" [--prompt ...] --seed 42 [--n-samples 1]
        [--scale 7.5] [--steps 50] [--sampler plms|ddim] [--eta 0] [--H 512] [--W 512]
        [--ema | --no-ema] [--arch sd-v1|tiny|mini] [--out outputs/samples] [--device cuda] [--precision autocast|full]
        [--clip-x0 auto|none|R]

CKPT is an original `.ckpt`/`.safetensors` (released EMA-only or full-ema files, or the trainer's
`<run.dir>/export/model.ckpt`; the export folder itself works too) or a diffusers pipeline folder. Image k (prompt by prompt, sample by sample) uses seed
`--seed + k`: the noise x_T [1, 4, H/8, W/8] is drawn on the CPU from that seed alone, so any image of an
evaluation can be regenerated from its caption and seed, on any device and in any batch.

After sampling, latents are decoded with 1/0.18215, mapped by clamp((x + 1) / 2, 0, 1) and quantised to
uint8 by truncation, `(255 * x).astype(np.uint8)` as txt2img does (diffusers rounds instead).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.adapters import ldm_checkpoint as ldm
from models.adapters.keys import KeyMismatchError, load_strict
from models.configs import SDConfig
from models.device import usable_device
from models.guidance import ClassifierFreeGuidance, unconditional_context
from models.samplers import DISCRETIZATIONS, SAMPLERS, ddim_timesteps, initial_noise, seeded_generators
from models.stable_diffusion import SDModels, build_models, load_ldm_checkpoint
from models.text_encoder import FrozenCLIPTextEncoder, encode_prompts
from models.tokenizer import CLIPTokenizer
from models.unet import UNetModel
from models.pixel_first_stage import PixelFirstStage
from models.vae import AutoencoderKL
from tools.convert import ARCHS
from train.export import checkpoint_arch, resolve_checkpoint  # noqa: F401 - tools.evaluate imports them from here

PRECISIONS = ("autocast", "full")
CLIP_X0_WORDS = ("auto", "none")


@dataclass(frozen=True)
class SamplingConfig:
    """How images are drawn; the defaults are the SD v1 model card's evaluation (50 PLMS steps, 512x512)."""

    sampler: str = "plms"
    steps: int = 50
    scale: float = 7.5
    eta: float = 0.0
    height: int = 512
    width: int = 512
    discretization: str = "uniform"
    # "autocast": float16 autocast on CUDA, txt2img's default (ignored on CPU); "full": float32 everywhere.
    precision: str = "autocast"
    # Clamp each step's pred_x0 to [-r, r] (models/samplers.py): "auto" clamps to the first stage's latent
    # range where it has one (the pixel-space first stage, as pixel-space diffusion samples) and not at all
    # for SD's VAE, whose latents have none (the original's samplers); "none", or r > 0.
    clip_x0: str | float = "auto"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.sampler == "plms" and self.eta != 0:
            raise ValueError(f"eta={self.eta} needs the DDIM sampler: PLMS is deterministic (set --sampler ddim or eta 0)")
        if self.eta < 0:
            raise ValueError(f"eta={self.eta} must be >= 0")
        if not 1 <= self.steps <= 1000:
            raise ValueError(f"steps={self.steps}: choose between 1 and 1000")
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization={self.discretization!r}: choose one of {', '.join(DISCRETIZATIONS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"image size {self.height}x{self.width} must be positive")
        if isinstance(self.clip_x0, str):
            if self.clip_x0 not in CLIP_X0_WORDS:
                raise ValueError(f"clip_x0={self.clip_x0!r}: choose {' or '.join(CLIP_X0_WORDS)}, or a bound r > 0")
        elif not self.clip_x0 > 0:
            raise ValueError(f"clip_x0={self.clip_x0}: a bound must be > 0 (or 'none' for no clamping)")

    def check_model(self, model: SDConfig) -> None:
        """Refuse, before any weights are read or anything is written, settings this architecture cannot
        sample with: steps whose timesteps run past its schedule, an image size its levels do not divide."""
        ddim_timesteps(self.steps, model.schedule.timesteps, self.discretization)
        f = image_multiple(model)
        if self.height % f or self.width % f:
            raise ValueError(f"image size {self.height}x{self.width} must be a multiple of {f} (first stage x UNet "
                             f"levels): e.g. --H {max(f, round(self.height / f) * f)} --W "
                             f"{max(f, round(self.width / f) * f)}")

    def clip_bound(self, first_stage: AutoencoderKL | PixelFirstStage) -> float | None:
        """The bound the sampler clamps pred_x0 to with this first stage (None: no clamping)."""
        if self.clip_x0 == "none":
            return None
        if self.clip_x0 == "auto":
            return first_stage.latent_bound if isinstance(first_stage, PixelFirstStage) else None
        return float(self.clip_x0)


@dataclass
class SamplingModels:
    """The inference parts of one checkpoint, in eval mode on one device."""

    unet: UNetModel
    vae: AutoencoderKL | PixelFirstStage
    text_encoder: FrozenCLIPTextEncoder
    tokenizer: CLIPTokenizer
    alphas_cumprod: torch.Tensor  # float32, CPU: what the original samplers read
    uncond: torch.Tensor  # CLIP("") [1, 77, C]
    device: torch.device
    weights: str  # which UNet weights these are, in words

    @classmethod
    def of(cls, unet: UNetModel, vae: AutoencoderKL | PixelFirstStage, text_encoder: FrozenCLIPTextEncoder,
           schedule, device: torch.device | str, weights: str) -> "SamplingModels":
        """From parts already on `device`: adds the CLIP tokenizer, CLIP("") and the schedule's alphas_cumprod
        as the samplers read them."""
        tokenizer = CLIPTokenizer()
        return cls(unet, vae, text_encoder, tokenizer, schedule.alphas_cumprod.detach().cpu().float(),
                   unconditional_context(tokenizer, text_encoder), torch.device(device), weights)


def image_multiple(model: SDConfig) -> int:
    """What image sides must be multiples of: the latents pass the UNet's len(channel_mult) - 1 downsamplings
    and come back to the skip connections."""
    first_stage = PixelFirstStage().factor if model.first_stage == "pixel" else model.vae.downsample_factor
    return first_stage * 2 ** (len(model.unet.channel_mult) - 1)


def _original_arch(source: Path, arch: str | None) -> str:
    arch = checkpoint_arch(source, arch)
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: choose one of {', '.join(sorted(ARCHS))}")
    return arch


def checkpoint_config(source: str | os.PathLike, arch: str | None = None) -> SDConfig:
    """The architecture loading `source` builds, from its name, export.json or config files alone."""
    source = resolve_checkpoint(source)
    if source.is_dir():
        from models.adapters.diffusers_folder import read_config

        return read_config(source)
    return ARCHS[_original_arch(source, arch)]()


def _load_parts(source: Path, arch: str | None, ema: bool | None) -> tuple[SDModels, str]:
    source = resolve_checkpoint(source)
    if source.is_dir():
        from models.adapters.diffusers_folder import load_diffusers

        if ema is False:
            raise ValueError(f"{source}: a diffusers folder holds one UNet; --no-ema only applies to full-ema checkpoints")
        cfg, parts = load_diffusers(source)
        m = build_models(cfg)
        load_strict(m.unet, parts["unet"], "UNet")
        load_strict(m.vae, parts["vae"], "VAE")
        load_strict(m.text_encoder, parts["text_encoder"], "text encoder")
        return m, f"the UNet of the diffusers folder {source}"
    m = load_ldm_checkpoint(source, ARCHS[_original_arch(source, arch)](), archs=ARCHS)
    # pick_unet returns the EMA dict when that is the choice, else the (empty) raw dict we pass: the UNet
    # module already holds the raw / single copy.
    chosen, which = ldm.LDMWeights(unet={}, vae={}, text_encoder={}, schedule={}, unet_ema=m.unet_ema).pick_unet(ema)
    if chosen:
        m.unet.load_state_dict(chosen, strict=True)
    m.unet_ema = None  # do not keep a second UNet in memory
    return m, which


def load_sampling_models(source: str | os.PathLike, arch: str | None = None, ema: bool | None = None,
                         device: torch.device | str = "cpu", sampling: SamplingConfig | None = None) -> SamplingModels:
    """Load a checkpoint for sampling. arch=None: a trainer export's own, else sd-v1 (see checkpoint_arch);
    ema=None: EMA weights when the file has both copies; `sampling`: settings to check against the
    architecture first."""
    device = usable_device(str(device))  # before reading gigabytes of weights
    if sampling is not None:
        sampling.check_model(checkpoint_config(source, arch))
    m, which = _load_parts(Path(source), arch, ema)
    unet = m.unet.eval().requires_grad_(False).to(device)
    vae = m.vae.eval().to(device)
    text_encoder = m.text_encoder.to(device)
    return SamplingModels.of(unet, vae, text_encoder, m.schedule, device, which)


def latent_factor(first_stage: AutoencoderKL | PixelFirstStage) -> int:
    """Image pixels per latent pixel (8 for SD v1's VAE and for the toy pixel-space first stage)."""
    return first_stage.factor if isinstance(first_stage, PixelFirstStage) else first_stage.cfg.downsample_factor


def _precision_scope(cfg: SamplingConfig, device: torch.device):
    if cfg.precision == "autocast" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def sample_latents(models: SamplingModels, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplingConfig,
                   scale: float | None = None, unet_forward=None) -> torch.Tensor:
    """Final latents [B, 4, H/8, W/8] (float32), one per (prompt, seed). `scale` overrides cfg.scale.

    `unet_forward`: what to call instead of `models.unet` (same weights), e.g. the trainer's wrapped
    module, whose forward is a collective under FSDP2 and ZeRO-3."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    # The latents pass the UNet's len(channel_mult) - 1 downsamplings and come back to the skip connections.
    f = latent_factor(models.vae) * 2 ** (len(models.unet.cfg.channel_mult) - 1)
    if cfg.height % f or cfg.width % f:
        raise ValueError(f"image size {cfg.height}x{cfg.width} must be a multiple of {f} (first stage x UNet levels)")
    f = latent_factor(models.vae)
    cond = encode_prompts(models.tokenizer, models.text_encoder, list(prompts))
    generators = seeded_generators(seeds)
    x = initial_noise(generators, (models.unet.cfg.in_channels, cfg.height // f, cfg.width // f), models.device)
    denoiser = ClassifierFreeGuidance(unet_forward or models.unet, models.uncond, cfg.scale if scale is None else scale)
    timesteps = ddim_timesteps(cfg.steps, models.alphas_cumprod.numel(), cfg.discretization)
    with _precision_scope(cfg, models.device):
        return SAMPLERS[cfg.sampler](denoiser, x, timesteps, cond, alphas_cumprod=models.alphas_cumprod, eta=cfg.eta,
                                     generator=generators, clip_x0=cfg.clip_bound(models.vae)).float()


@torch.no_grad()
def decode(models: SamplingModels, z: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Latents -> images in [0, 1] [B, 3, H, W] float32: decode with 1/scale_factor, clamp((x + 1) / 2, 0, 1)."""
    with _precision_scope(cfg, models.device):
        weight = next(models.vae.parameters(), None)  # the pixel-space first stage has none
        images = models.vae.decode_latents(z if weight is None else z.to(weight.dtype))
    return torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3] on the CPU, truncating like txt2img's astype(np.uint8)."""
    return (255.0 * images.float()).permute(0, 2, 3, 1).to(torch.uint8).cpu()


def txt2img(models: SamplingModels, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplingConfig,
            scale: float | None = None) -> torch.Tensor:
    """One image per (prompt, seed): uint8 [B, H, W, 3] on the CPU. `scale` overrides cfg.scale."""
    return to_uint8(decode(models, sample_latents(models, prompts, seeds, cfg, scale), cfg))


def save_png(path: Path, image: torch.Tensor | np.ndarray) -> None:
    """Write atomically (a temporary name, then rename), so a killed run never leaves a half-written PNG
    that a resumed run would take for a finished one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:limit] or "empty"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_sampling_args(parser: argparse.ArgumentParser, scale: bool = True) -> None:
    d = SamplingConfig()
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=d.sampler)
    parser.add_argument("--steps", type=int, default=d.steps, help="DDIM/PLMS steps (T // steps spacing, +1 shift)")
    if scale:
        parser.add_argument("--scale", type=float, default=d.scale, help="classifier-free guidance scale (1: none)")
    parser.add_argument("--eta", type=float, default=d.eta, help="DDIM eta (PLMS needs 0)")
    parser.add_argument("--H", dest="height", type=int, default=d.height)
    parser.add_argument("--W", dest="width", type=int, default=d.width)
    parser.add_argument("--discretization", choices=DISCRETIZATIONS, default=d.discretization)
    parser.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    parser.add_argument("--clip-x0", type=_clip_x0_arg, default=d.clip_x0, metavar="auto|none|R",
                        help="clamp each step's predicted x0 to [-R, R]; auto: to the first stage's latent range "
                             "where it has one (the pixel-space first stage), never for SD's VAE")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="architecture of an original checkpoint (default: a trainer export's, from its "
                             "export.json, else sd-v1; diffusers folders carry their own config)")
    ema = parser.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=None,
                     help="EMA UNet weights (the default when the checkpoint has both copies)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="raw (non-EMA) UNet weights")
    parser.add_argument("--device", default=default_device())


def _clip_x0_arg(text: str) -> str | float:
    if text in CLIP_X0_WORDS:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {' or '.join(CLIP_X0_WORDS)}, or a number") from None


def sampling_config(args: argparse.Namespace, scale: float = 7.5) -> SamplingConfig:
    return SamplingConfig(sampler=args.sampler, steps=args.steps, scale=getattr(args, "scale", scale), eta=args.eta,
                          height=args.height, width=args.width, discretization=args.discretization,
                          precision=args.precision, clip_x0=args.clip_x0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sample", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="original .ckpt/.safetensors file or diffusers folder")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    parser.add_argument("--n-samples", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("outputs/samples"))
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = sampling_config(args)
    except ValueError as err:
        parser.error(str(err))
    if args.n_samples < 1 or args.batch_size < 1:
        parser.error("--n-samples and --batch-size must be >= 1")

    try:
        models = load_sampling_models(args.checkpoint, args.arch, args.ema, args.device, sampling=cfg)
        print(f"UNet: {models.weights}", file=sys.stderr)
        jobs = [(p, args.seed + k) for k, p in enumerate(p for p in args.prompt for _ in range(args.n_samples))]
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            images = txt2img(models, [p for p, _ in batch], [s for _, s in batch], cfg)
            for (prompt, seed), image in zip(batch, images):
                path = args.out / f"{seed:08d}-{_slug(prompt)}.png"
                save_png(path, image.numpy())
                print(path)
    except (ValueError, FileNotFoundError, KeyMismatchError) as err:  # wrong inputs: say what, without a traceback
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
