"""The SD v1 first stage: CompVis' KL-regularised autoencoder (`ldm.models.autoencoder.AutoencoderKL`
with the `Encoder`/`Decoder` of `ldm.modules.diffusionmodules.model`), re-implemented.

Module and attribute names are the original ones on purpose: `state_dict()` keys prefixed with
`first_stage_model.` are exactly those of a released SD v1 checkpoint, so the `.ckpt` adapter only adds
a prefix. Like the v1 config, only the middle of the encoder and decoder has attention
(`attn_resolutions: []`), and there is no timestep embedding (`temb_ch = 0`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .configs import VAEConfig


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    # ldm uses eps=1e-6 (not torch's default 1e-5) for every norm of the autoencoder.
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    # ldm's nonlinearity is x * sigmoid(x); F.silu is the same function as one fused kernel.
    return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        # Registration order matches ldm so state_dict() lists keys in the checkpoint's order.
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # ldm's default conv_shortcut=False: a 1x1 "network-in-network" projection when widths differ.
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class TokenConv1x1(nn.Conv2d):
    """A 1x1 conv (checkpoint weight shape [C, C, 1, 1], as in ldm) applied to (B, T, C) tokens as the
    linear map it is. Working on tokens saves a transpose per projection and is exactly the op sequence
    of diffusers' attention, so outputs match diffusers bitwise on CPU. Still a module call, so
    forward hooks (ZeRO-3 gathering, profilers) see it."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens, self.weight.flatten(1), self.bias)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (the VAE's only attention, in its middle)."""

    def __init__(self, channels: int, groups: int, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.norm = Normalize(channels, groups)
        self.q = TokenConv1x1(channels)
        self.k = TokenConv1x1(channels)
        self.v = TokenConv1x1(channels)
        self.proj_out = TokenConv1x1(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B, 1 head, H*W, C)
        # softmax(q k^T / sqrt(C)) v: the product ldm computes with two bmm's.
        h = self.proj_out(attention(q, k, v, self.backend).squeeze(1))
        return x + h.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ldm pads only right and bottom (torch's symmetric padding would shift the sampling grid).
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, cfg: VAEConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups, cfg.attention_backend)
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        for i in range(n):
            level = nn.Module()
            block_in, block_out = ch * in_mult[i], ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, cfg.norm_groups, cfg.dropout)
                for j in range(cfg.num_res_blocks)
            )
            if i != n - 1:  # every level but the deepest halves the resolution
                level.downsample = Downsample(block_out)
            self.down.append(level)
        block_in = ch * cfg.ch_mult[-1]
        self.mid = _mid(block_in, cfg)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        # double_z: the encoder emits mean and log-variance side by side.
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        block_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        # Built deepest level first, but stored so that up[i] is level i (ldm inserts at the front):
        # up.0 is the full-resolution level, up.{n-1} the deepest, as in the checkpoint keys.
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            level = nn.Module()
            block_out = ch * cfg.ch_mult[i]
            # One more block per level than the encoder has.
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out, cfg.norm_groups, cfg.dropout)
                for j in range(cfg.num_res_blocks + 1)
            )
            block_in = block_out
            if i != 0:  # every level but the full-resolution one doubles the resolution on its way out
                level.upsample = Upsample(block_out)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in, cfg.norm_groups)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The posterior q(z|x): `parameters` holds mean and log-variance stacked on dim 1."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Clamped as in ldm so exp() can neither underflow to 0 nor overflow.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        # Draw on the generator's device (a CPU generator gives the same latents on any accelerator).
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over C, H, W; `other=None` means N(0, I)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        if not cfg.double_z:
            # ldm asserts this too: the KL posterior needs both mean and log-variance.
            raise ValueError("vae.double_z must be True for the KL autoencoder")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        # A plain float, not a buffer: the v1 checkpoint has no scale_factor key (scale_by_std=False).
        self.scale_factor = cfg.scale_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: torch.Tensor, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        """Image in [-1, 1] -> UNet latents: a posterior sample (ldm's get_first_stage_encoding) or its mean,
        times scale_factor so the latents have roughly unit variance."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """UNet latents -> image in about [-1, 1]; undoes encode_latents' scaling first."""
        return self.decode(z / self.scale_factor)
