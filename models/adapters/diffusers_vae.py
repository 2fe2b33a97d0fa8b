"""Our (= CompVis) AutoencoderKL keys <-> diffusers' `AutoencoderKL` keys, and the two configs.

The key map is generated from the config by walking the same levels and blocks the model builds, so
any width/depth converts; nothing is a hard-coded key list. Conversion is strict in both directions:
every key must be mapped exactly once and shapes must match, else KeyMismatchError lists the offenders.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..configs import VAEConfig
from .keys import check_keys, check_shapes

# Per-module renames inside a resnet block; nin_shortcut only exists where the width changes.
_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
# The mid attention: ldm has 1x1 convs ([C, C, 1, 1]); diffusers has Linear layers ([C, C]).
_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_LINEAR_IN_DIFFUSERS = {"to_q", "to_k", "to_v", "to_out.0"}


def _check_representable(cfg: VAEConfig) -> None:
    """diffusers' AutoencoderKL cannot express every VAEConfig; refuse rather than convert wrongly."""
    problems = []
    if not cfg.double_z:
        problems.append("double_z must be True")
    if cfg.z_channels != cfg.embed_dim:
        problems.append(f"z_channels={cfg.z_channels} != embed_dim={cfg.embed_dim} (diffusers has one latent_channels)")
    if cfg.ch_mult[0] != 1:
        # diffusers' conv_in emits block_out_channels[0]; ldm's emits ch, so ch_mult[0] must be 1.
        problems.append(f"ch_mult[0]={cfg.ch_mult[0]} must be 1")
    if cfg.dropout != 0.0:
        problems.append(f"dropout={cfg.dropout} (diffusers' VAE has no dropout)")
    if problems:
        raise ValueError("VAE config has no diffusers equivalent: " + "; ".join(problems))


def _module_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(our module path, diffusers module path) for every module that holds weight and bias."""
    ch, n, r = cfg.ch, len(cfg.ch_mult), cfg.num_res_blocks
    pairs: list[tuple[str, str]] = []

    def resnet(ours: str, theirs: str, c_in: int, c_out: int) -> None:
        pairs.extend((f"{ours}.{a}", f"{theirs}.{b}") for a, b in _RESNET)
        if c_in != c_out:
            pairs.append((f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut"))

    def mid(part: str, c: int) -> None:
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", c, c)
        pairs.extend((f"{part}.mid.attn_1.{a}", f"{part}.mid_block.attentions.0.{b}") for a, b in _ATTN)
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", c, c)

    pairs.append(("encoder.conv_in", "encoder.conv_in"))
    c_in = ch
    for i in range(n):
        c_out = ch * cfg.ch_mult[i]
        for j in range(r):
            resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c_in, c_out)
            c_in = c_out
        if i != n - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    mid("encoder", c_in)
    pairs += [("encoder.norm_out", "encoder.conv_norm_out"), ("encoder.conv_out", "encoder.conv_out")]

    pairs.append(("decoder.conv_in", "decoder.conv_in"))
    mid("decoder", c_in)
    # diffusers numbers decoder blocks in execution order (deepest first); ldm numbers them by level.
    for k in range(n):
        i = n - 1 - k
        c_out = ch * cfg.ch_mult[i]
        for j in range(r + 1):
            resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", c_in, c_out)
            c_in = c_out
        if i != 0:
            pairs.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv"))
    pairs += [("decoder.norm_out", "decoder.conv_norm_out"), ("decoder.conv_out", "decoder.conv_out")]

    pairs += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    return pairs


def key_map(cfg: VAEConfig) -> dict[str, str]:
    """our key -> diffusers key, one entry per tensor."""
    _check_representable(cfg)
    mapping = {f"{o}.{p}": f"{t}.{p}" for o, t in _module_pairs(cfg) for p in ("weight", "bias")}
    # Both sides must be unique, or some tensor would be dropped or written twice.
    assert len(set(mapping.values())) == len(mapping), "diffusers VAE key map is not one-to-one"
    return mapping


def _expected_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    from ..vae import AutoencoderKL

    with torch.device("meta"):  # shapes only: no memory, no init cost
        return {k: v.shape for k, v in AutoencoderKL(cfg).state_dict().items()}


def _is_linear(diffusers_key: str) -> bool:
    module, param = diffusers_key.rsplit(".", 1)
    return param == "weight" and any(module.endswith("." + name) for name in _LINEAR_IN_DIFFUSERS)


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our state dict (no `first_stage_model.` prefix) -> diffusers AutoencoderKL state dict."""
    mapping = key_map(cfg)
    check_shapes(_expected_shapes(cfg), state, "VAE -> diffusers")
    out = {}
    for ours, theirs in mapping.items():
        t = state[ours]
        out[theirs] = t.reshape(t.shape[0], t.shape[1]) if _is_linear(theirs) else t  # drop the 1x1 kernel dims
    return out


def from_diffusers(state: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ours (load with `load_strict`, or prefix for a `.ckpt`)."""
    mapping = key_map(cfg)
    check_keys(mapping.values(), state.keys(), "diffusers -> VAE")
    out = {}
    for ours, theirs in mapping.items():
        t = state[theirs]
        out[ours] = t.reshape(*t.shape, 1, 1) if _is_linear(theirs) else t  # add the 1x1 kernel dims
    expected = _expected_shapes(cfg)
    check_shapes(expected, out, "diffusers -> VAE")
    return {k: out[k] for k in expected}  # our state_dict() order (the checkpoint's), not diffusers'


def diffusers_config(cfg: VAEConfig, sample_size: int = 512) -> dict:
    """The kwargs / config.json of diffusers' AutoencoderKL for this architecture.

    sample_size only drives diffusers' tiled decoding; SD v1's VAE config.json uses 512.
    """
    _check_representable(cfg)
    n = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
    }


# Keys of a diffusers config that must hold these values for the SD v1 architecture (absent = default).
_REQUIRED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
             "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
# Keys that do not change the weights or the math of encode/decode.
_IGNORED = {"sample_size", "force_upcast"}


def config_from_diffusers(d: Mapping, **overrides) -> VAEConfig:
    """A diffusers AutoencoderKL config (dict or config.json contents) -> VAEConfig; refuses what we lack."""
    d = {k: v for k, v in d.items() if not k.startswith("_")}  # _class_name, _diffusers_version, ...
    known = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"} | set(_REQUIRED) | _IGNORED
    problems = [f"unknown key {k!r}" for k in sorted(set(d) - known)]
    problems += [f"{k}={d[k]!r} (need {v!r})" for k, v in _REQUIRED.items() if k in d and d[k] != v]
    # No defaults for the structure: diffusers' own (one 64-wide level) is never what a checkpoint means.
    structural = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")
    missing = [k for k in structural if k not in d]
    if missing:
        raise ValueError(f"diffusers VAE config lacks {missing}")
    blocks = list(d["block_out_channels"])
    n = len(blocks)
    if list(d["down_block_types"]) != ["DownEncoderBlock2D"] * n:
        problems.append(f"down_block_types={d['down_block_types']!r}")
    if list(d["up_block_types"]) != ["UpDecoderBlock2D"] * n:
        problems.append(f"up_block_types={d['up_block_types']!r}")
    ch = blocks[0]
    if any(c % ch for c in blocks):
        problems.append(f"block_out_channels={blocks} are not multiples of the first")
    if problems:
        raise ValueError("diffusers VAE config not supported: " + "; ".join(problems))
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_ch=d.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(c // ch for c in blocks),
        num_res_blocks=d["layers_per_block"],
        z_channels=d.get("latent_channels", 4),
        embed_dim=d.get("latent_channels", 4),
        double_z=True,
        norm_groups=d.get("norm_num_groups", 32),
        scale_factor=d.get("scaling_factor", 0.18215),
        **overrides,  # e.g. attention_backend, which diffusers' config does not carry
    )
