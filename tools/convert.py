"""Convert SD v1 weights between the original checkpoint layout and diffusers' folder layout.

    python -m tools.convert SRC DST [--from FMT] [--to FMT] [--ema | --no-ema] [--arch sd-v1|tiny]

Formats are recognised from the paths: a directory (or a path without a suffix) is a diffusers
pipeline folder, unless it is a trainer export (`<run.dir>/export`, `<run.dir>/exports/step-N`: its
model.ckpt is read, and its export.json names the architecture); `.ckpt`/`.pt`/`.pth` is an original
Lightning checkpoint; `.safetensors` is the original layout in safetensors. --from/--to override the
name: `--to safetensors out.pt` writes safetensors under that name.

Which UNet weights go where (a -full-ema checkpoint holds two copies: raw in model.diffusion_model.*,
EMA in model_ema.*):
  to diffusers    EMA by default when the source has both; --no-ema takes the raw weights.
  to a checkpoint both copies are kept (a full-ema file) by default; --ema writes an EMA-only file
                  (EMA weights in model.diffusion_model.*, like the released sd-v1-N.ckpt); --no-ema
                  writes the raw weights only.
The choice made is always printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from models import configs
from models.adapters import diffusers_folder, ldm_checkpoint as ldm
from models.adapters.keys import KeyMismatchError
from models.schedule import schedule_buffers
from models.stable_diffusion import layout_error, split_ldm
from train.export import checkpoint_arch, resolve_checkpoint

FORMATS = ("diffusers", "ckpt", "safetensors")
ARCHS = {"sd-v1": configs.sd_v1, "tiny": configs.tiny, "mini": configs.mini}


def detect_format(path: Path) -> str:
    if path.is_dir() or not path.suffix:
        return "diffusers"
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return "ckpt"
    raise SystemExit(f"cannot tell the format of {path} from its name; pass --from/--to ({', '.join(FORMATS)})")


def read(path: Path, fmt: str, arch: str) -> tuple[configs.SDConfig, ldm.LDMWeights]:
    if fmt == "diffusers":
        cfg, parts = diffusers_folder.load_diffusers(path)
        return cfg, ldm.LDMWeights(unet=parts["unet"], vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   schedule=schedule_buffers(cfg.schedule))
    cfg = ARCHS[arch]()
    sd, step = ldm.read_checkpoint(path, fmt)  # the format resolved from --from or the name, not re-guessed
    try:
        weights = split_ldm(sd, cfg, path)
    except KeyMismatchError as err:
        raise layout_error(err, sd, path, ARCHS) from None
    weights.global_step = step
    return cfg, weights


def write(path: Path, fmt: str, cfg: configs.SDConfig, w: ldm.LDMWeights, ema: bool | None, log) -> None:
    if fmt == "diffusers":
        unet, which = w.pick_unet(ema)
        log(f"UNet: {which} -> {path}/unet")
        diffusers_folder.save_diffusers(path, cfg, unet, w.vae, w.text_encoder)
        return
    if ema is None:
        log("UNet: " + ("raw and EMA copies (full-ema layout)" if w.unet_ema is not None else "the single copy"))
    else:
        unet, which = w.pick_unet(ema)
        log(f"UNet: {which} -> model.diffusion_model.* ({'EMA-only layout' if ema else 'no EMA copy'})")
        w = dataclasses.replace(w, unet=unet, unet_ema=None)
    sd = ldm.join_state_dict(w, position_ids=cfg.text.max_position_embeddings)
    ldm.write_checkpoint(path, sd, w.global_step, fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--from", dest="src_format", choices=FORMATS)
    parser.add_argument("--to", dest="dst_format", choices=FORMATS)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--ema", dest="ema", action="store_true", default=None, help="use the EMA UNet weights")
    choice.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw (non-EMA) UNet weights")
    parser.add_argument("--arch", choices=sorted(ARCHS), default=None,
                        help="architecture of an original checkpoint (default: a trainer export's own, from its "
                             "export.json, else sd-v1; diffusers folders carry their own config)")
    args = parser.parse_args(argv)

    if args.src.is_dir() and args.src_format in (None, "ckpt"):
        try:  # a trainer export folder is read as its model.ckpt; a diffusers folder stays as it is
            args.src = resolve_checkpoint(args.src)
        except FileNotFoundError as err:
            parser.error(str(err))
    src_format = args.src_format or detect_format(args.src)
    dst_format = args.dst_format or detect_format(args.dst)
    if args.dst.exists() and dst_format == "diffusers" and any(args.dst.iterdir()):
        parser.error(f"{args.dst} exists and is not empty; choose a new folder")
    if src_format == "diffusers" and args.ema is False:
        parser.error("a diffusers folder holds one UNet; --no-ema chooses between the two copies of a full-ema checkpoint")
    try:
        arch = checkpoint_arch(args.src, args.arch) if src_format != "diffusers" else "sd-v1"
        cfg, weights = read(args.src, src_format, arch)
        write(args.dst, dst_format, cfg, weights, args.ema, log=lambda msg: print(msg, file=sys.stderr))
    except (ValueError, FileNotFoundError, KeyMismatchError) as err:  # wrong inputs: say what, without a traceback
        parser.error(str(err))
    print(f"wrote {args.dst} ({dst_format}) from {args.src} ({src_format})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
