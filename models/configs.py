"""Typed architecture configs. The defaults are SD v1 (CompVis `v1-inference.yaml`); `tiny()` keeps
the same architecture at toy width for tests and the embedded default."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from models.attention import BACKENDS


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsample factors (1 = full latent resolution) that get a SpatialTransformer.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    dropout: float = 0.0
    # "sdpa" (torch scaled_dot_product_attention, its kernel chosen per call), "sdpa-flash" /
    # "sdpa-cudnn" / "sdpa-efficient" (one SDPA kernel pinned), "xformers" (GPU extra) or "math"
    # (reference); models/attention.py.
    attention_backend: str = "sdpa"
    # Activation checkpointing of each UNet block while training (never in eval): "none", "full"
    # (recompute the whole block in backward) or "selective" (keep the outputs of convolutions, matmuls
    # and attention, recompute only the cheap norms and pointwise ops; see models/checkpoint_policy.py).
    activation_checkpointing: str = "none"

    def __post_init__(self) -> None:
        if self.model_channels % self.norm_groups:
            raise ValueError(f"unet.model_channels={self.model_channels} must be a multiple of norm_groups={self.norm_groups}")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.num_heads:
                raise ValueError(f"unet: channels {self.model_channels * mult} not divisible by num_heads={self.num_heads}")
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ValueError(f"unet.activation_checkpointing={self.activation_checkpointing!r}: choose none, full "
                             "or selective")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"unet.attention_backend={self.attention_backend!r}: choose one of {', '.join(BACKENDS)}")
        max_factor = 2 ** (len(self.channel_mult) - 1)
        for f in self.attention_resolutions:
            if f > max_factor or f & (f - 1):
                raise ValueError(f"unet.attention_resolutions has {f}: must be a power of two <= {max_factor}")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    double_z: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    attention_backend: str = "sdpa"
    # Latents are scaled by this before the UNet sees them (SD v1: 0.18215).
    scale_factor: float = 0.18215

    def __post_init__(self) -> None:
        if self.ch % self.norm_groups:
            raise ValueError(f"vae.ch={self.ch} must be a multiple of norm_groups={self.norm_groups}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"vae.attention_backend={self.attention_backend!r}: choose one of {', '.join(BACKENDS)}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP ViT-L/14 text tower, as a transformers `CLIPTextConfig`."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    pad_token_id: int = 49407

    def to_transformers(self):
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            projection_dim=self.projection_dim,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )


@dataclass(frozen=True)
class ScheduleConfig:
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    # "linear" as in CompVis: linspace of square roots, then squared.
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"schedule.beta_schedule={self.beta_schedule!r}: only 'linear' (SD v1) is supported")


@dataclass(frozen=True)
class SDConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # "vae" (AutoencoderKL, SD v1) or "pixel" (parameter-free average pooling: toy runs only).
    first_stage: str = "vae"
    # Toy runs only: std of the random text encoder's token embeddings (None: CLIP's init, 0.02). SD's
    # encoder is pretrained CLIP, whose features tell words apart; a random tiny CLIP at CLIP's init
    # does not (its layers wash the word out: cosine 0.88 between the features of "red" and "blue" in
    # the same caption). At 0.5 the word dominates its position's feature (cosine 0.06), as in a
    # trained encoder, so a toy UNet can learn to follow it.
    text_token_init_std: float | None = None

    def __post_init__(self) -> None:
        if self.first_stage not in ("vae", "pixel"):
            raise ValueError(f"first_stage={self.first_stage!r}: choose vae or pixel")
        if self.unet.context_dim != self.text.hidden_size:
            raise ValueError(
                f"unet.context_dim={self.unet.context_dim} must equal text.hidden_size={self.text.hidden_size}"
            )
        if self.unet.in_channels != self.vae.embed_dim:
            raise ValueError(f"unet.in_channels={self.unet.in_channels} must equal vae.embed_dim={self.vae.embed_dim}")


def sd_v1() -> SDConfig:
    return SDConfig()


def tiny() -> SDConfig:
    """The SD v1 architecture at toy width: every block type and key pattern is present."""
    return SDConfig(
        unet=UNetConfig(model_channels=32, context_dim=32, num_heads=8),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2)),
        text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               projection_dim=32),
    )


def mini() -> SDConfig:
    """tiny() with the pixel-space first stage, 2 attention heads and a random text encoder whose token
    embeddings keep words apart: the embedded miniature reproduction.

    At width 32, SD's 8 heads would be 4 channels each; 2 heads give 16/32/64."""
    base = tiny()
    return replace(base, first_stage="pixel", unet=replace(base.unet, num_heads=2), text_token_init_std=0.5)


def with_overrides(cfg: SDConfig, **parts) -> SDConfig:
    return replace(cfg, **parts)
