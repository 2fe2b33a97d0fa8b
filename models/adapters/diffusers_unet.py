"""Our UNet (original CompVis key names) <-> diffusers `UNet2DConditionModel`.

The mapping is built from the config, module by module (a prefix on one side to a prefix on the
other), then every tensor key is renamed through it. Inside a ResBlock and a transformer the leaf
names differ only for ResBlocks; the transformer internals are named alike in both libraries.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..configs import UNetConfig
from .keys import KeyMismatchError, check_keys

_RESBLOCK_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _module_prefixes(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(ours, diffusers, kind) for every module whose internals are renamed by `kind`."""
    pairs: list[tuple[str, str, str]] = [
        ("time_embed.0", "time_embedding.linear_1", "leaf"),
        ("time_embed.2", "time_embedding.linear_2", "leaf"),
        ("input_blocks.0.0", "conv_in", "leaf"),
        ("out.0", "conv_norm_out", "leaf"),
        ("out.2", "conv_out", "leaf"),
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "same"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    levels = len(cfg.channel_mult)
    block, factor = 1, 1
    for level in range(levels):
        has_attn = factor in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if has_attn:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "same"))
            block += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "leaf"))
            block += 1
            factor *= 2
    block = 0
    for up in range(levels):  # diffusers' up_blocks.0 is our deepest level
        has_attn = factor in cfg.attention_resolutions
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", "res"))
            if has_attn:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}", "same"))
            if up != levels - 1 and j == cfg.num_res_blocks:
                index = 2 if has_attn else 1
                pairs.append((f"output_blocks.{block}.{index}.conv", f"up_blocks.{up}.upsamplers.0.conv", "leaf"))
            block += 1
        if up != levels - 1:
            factor //= 2
    return pairs


def _rename(key: str, pairs: list[tuple[str, str, str]]) -> str | None:
    for ours, theirs, kind in pairs:
        if key.startswith(ours + "."):
            rest = key[len(ours) + 1:]
            if kind == "res":
                leaf, _, param = rest.rpartition(".")
                if leaf not in _RESBLOCK_LEAVES:
                    return None
                rest = f"{_RESBLOCK_LEAVES[leaf]}.{param}"
            return f"{theirs}.{rest}"
    return None


def key_map(cfg: UNetConfig, our_keys: list[str]) -> dict[str, str]:
    """Our key -> diffusers key, for every key in `our_keys` (raises if one has no counterpart)."""
    pairs = sorted(_module_prefixes(cfg), key=lambda p: -len(p[0]))  # longest prefix wins
    mapping = {key: _rename(key, pairs) for key in our_keys}
    unmapped = [k for k, v in mapping.items() if v is None]
    if unmapped:
        raise KeyMismatchError("UNet -> diffusers: keys with no diffusers name:\n    " + "\n    ".join(unmapped))
    return mapping


def _our_keys(cfg: UNetConfig) -> list[str]:
    from ..unet import UNetModel

    with torch.device("meta"):
        return list(UNetModel(cfg).state_dict())


def to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    expected = _our_keys(cfg)
    check_keys(expected, state.keys(), "UNet (ours)")
    mapping = key_map(cfg, expected)
    return {mapping[k]: state[k] for k in expected}


def from_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    expected = _our_keys(cfg)
    inverse = {theirs: ours for ours, theirs in key_map(cfg, expected).items()}
    check_keys(inverse.keys(), state.keys(), "UNet (diffusers)")
    return {inverse[k]: state[k] for k in sorted(inverse, key=lambda k: expected.index(inverse[k]))}


def diffusers_config(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """The `UNet2DConditionModel` config.json equivalent to `cfg`."""
    levels = len(cfg.channel_mult)
    factors = [2 ** i for i in range(levels)]
    down = ["CrossAttnDownBlock2D" if f in cfg.attention_resolutions else "DownBlock2D" for f in factors]
    up = ["CrossAttnUpBlock2D" if f in cfg.attention_resolutions else "UpBlock2D" for f in reversed(factors)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        # diffusers' historical misnomer: for SD v1 "attention_head_dim" is the number of heads.
        "attention_head_dim": cfg.num_heads,
        "transformer_layers_per_block": cfg.transformer_depth,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "use_linear_projection": False,
        "dropout": cfg.dropout,
    }


def config_from_diffusers(d: Mapping) -> UNetConfig:
    """The UNetConfig for a diffusers UNet config; refuses variants SD v1 does not have."""
    checks = {
        "use_linear_projection": False, "flip_sin_to_cos": True, "freq_shift": 0, "center_input_sample": False,
        "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    for key, want in checks.items():
        if d.get(key, want) != want:
            raise ValueError(f"diffusers UNet config has {key}={d[key]!r}; the SD v1 architecture needs {want!r}")
    heads = d.get("num_attention_heads") or d["attention_head_dim"]
    if not isinstance(heads, int):
        raise ValueError(f"per-block head counts {heads!r} are not SD v1 (one head count for all blocks)")
    channels = list(d["block_out_channels"])
    base = channels[0]
    down = list(d["down_block_types"])
    return UNetConfig(
        in_channels=d["in_channels"],
        out_channels=d["out_channels"],
        model_channels=base,
        channel_mult=tuple(c // base for c in channels),
        num_res_blocks=d["layers_per_block"],
        attention_resolutions=tuple(sorted((2 ** i for i, t in enumerate(down) if t.startswith("CrossAttn")), reverse=True)),
        num_heads=heads,
        transformer_depth=d.get("transformer_layers_per_block", 1),
        context_dim=d["cross_attention_dim"],
        norm_groups=d.get("norm_num_groups", 32),
        dropout=d.get("dropout", 0.0),
    )
