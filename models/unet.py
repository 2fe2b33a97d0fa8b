"""The SD v1 latent UNet (CompVis `openaimodel.UNetModel` with `use_spatial_transformer=True`,
`legacy=False`), written so that `state_dict()` keys equal the original checkpoint's after the
`model.diffusion_model.` prefix.

Layout of the original, which the key names encode:
  time_embed.{0,2}                      MLP on the sinusoidal timestep embedding
  input_blocks.0.0                      conv_in
  input_blocks.{3l+1, 3l+2}             ResBlock [+ SpatialTransformer] per level l
  input_blocks.{3l+3}.0.op              Downsample (all levels but the last)
  middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
  output_blocks.{3l+j}                  ResBlock [+ SpatialTransformer] [+ Upsample], deepest first
  out.{0,2}                             GroupNorm, SiLU, conv_out
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .checkpoint_policy import selective_checkpoint_context
from .configs import UNetConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activation dtype, as the original does (its parameters are
    upcast too: under FSDP2 mixed precision they arrive in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] with frequencies exp(-ln(max_period) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """CompVis' `zero_module`: the last layer of every residual branch starts at zero, so a UNet trained
    from scratch (sd-v1-1 was) starts as the identity path plus the skip connections."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention over `context` (self-attention when context is None); q/k/v without bias."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, backend: str):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads, self.backend = heads, backend
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim), nn.Dropout(0.0))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = attention(q, k, v, self.backend)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, dropout: float, backend: str):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, backend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over H*W tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int, dropout: float,
                 backend: str):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim, dropout, backend) for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Passes each layer what it needs: the timestep embedding to ResBlocks, the context to transformers.

    A block is also the unit of activation checkpointing ("none", "full", "selective"), applied inside its
    forward so that `block.compile()` traces the checkpoint too (a compiled region handles the
    selective policy as part of its graph)."""

    checkpointing: str = "none"

    def _layers(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # Recompute in backward only while training with grad: eval and no-grad pay nothing.
        if self.checkpointing == "none" or not (self.training and torch.is_grad_enabled()):
            return self._layers(x, emb, context)
        if self.checkpointing == "selective":
            return checkpoint(self._layers, x, emb, context, use_reentrant=False,
                              context_fn=selective_checkpoint_context)
        return checkpoint(self._layers, x, emb, context, use_reentrant=False)


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = ch * 4

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, emb_dim, c_out, cfg.dropout, groups)

        def attn(c: int) -> SpatialTransformer:
            return SpatialTransformer(c, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, groups, cfg.dropout,
                                      cfg.attention_backend)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        cur, factor = ch, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [res(cur, ch * mult)]
                cur = ch * mult
                if factor in cfg.attention_resolutions:
                    layers.append(attn(cur))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(cur)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(cur)))
                skip_channels.append(cur)
                factor *= 2

        self.middle_block = TimestepEmbedSequential(res(cur, cur), attn(cur), res(cur, cur))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(cur + skip_channels.pop(), ch * mult)]
                cur = ch * mult
                if factor in cfg.attention_resolutions:
                    layers.append(attn(cur))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                    factor //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(groups, cur), nn.SiLU(),
                                 zero_module(nn.Conv2d(cur, cfg.out_channels, 3, padding=1)))
        for block in self.blocks():
            block.checkpointing = cfg.activation_checkpointing
        self.memory_format = torch.contiguous_format

    def use_channels_last(self, weights: bool = True) -> "UNetModel":
        """NHWC convolutions (tensor-core kernels without layout transposes; the transformers' token
        views become free). The input is converted at every call, which keeps every activation NHWC (a
        convolution with an NHWC input runs NHWC); `weights` also stores the conv weights NHWC, which
        saves their per-call conversion but is refused by FSDP2 and DeepSpeed (contiguous tensors only).
        The same network numerically."""
        if weights:
            self.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        return self

    def blocks(self) -> list[TimestepEmbedSequential]:
        """The units of checkpointing, per-block compile and FSDP2 sharding, in execution order."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy latents; timesteps: (B,) ints in [0, T); context: (B, 77, context_dim)."""
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)
        emb = self.time_embed(t_emb)
        h, skips = x.contiguous(memory_format=self.memory_format), []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
