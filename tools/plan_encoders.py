"""The frozen VAE encoder's share of a stage plan (tools/plan_cost.py), priced both ways: precomputed
(`python -m data precompute`: one forward per distinct image, before training) or in the training loop
(one per sample, on top of each step's compute, so free while a step waits for the network). And the
SD v1 frozen encoders' FLOPs, which plan_cost adds to a step's with --vae-online / --text-online.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plan_cost imports this module
    from tools.plan_cost import FlopsModel, Hardware, Stage, StageCost


@dataclass(frozen=True)
class VaeEncoderCost:
    """The frozen VAE encoder for one dataset at one resolution, both ways: precomputed (`python -m data
    precompute`: one forward per distinct image, before training) or in the training loop (one per
    sample). Hours take the encoder's measured img/s where given, else assume it runs at the UNet step's
    compute MFU."""

    dataset: str  # a data/stages.py subset, or "<stage>'s shards"
    resolution: int
    stages: tuple[str, ...]
    precomputed: bool  # what these stages' configs do (stage.data.latents)
    samples: int  # training samples drawn from it: what the loop encodes
    images: int  # what a precompute encodes: the samples drawn, or fewer where the subset has fewer rows
    flops_per_image: float
    # Where its seconds per image come from: "measured" (--vae-img-per-s, bench/vae_encode.py) or
    # "assumed" (the UNet step's MFU).
    throughput: str
    precompute_gpu_hours: float | None  # None: no throughput given
    # What the encoder adds to the training steps: nothing where a step waits for the network anyway
    # (the encoder's time hides in the wait), its full time where the step computes longer.
    loop_gpu_hours: float | None

    @property
    def gpu_hours(self) -> float | None:
        """As the stages run it."""
        return self.precompute_gpu_hours if self.precomputed else self.loop_gpu_hours


def vae_encode_flops_per_image(resolution: int) -> float:
    """SD v1 VAE encoder forward (train/flops.py): 273 GFLOP at 256, 1,117 at 512."""
    from models.configs import VAEConfig
    from train.flops import vae_encode_flops_per_image as counted

    return counted(VAEConfig(), resolution)


def text_encode_flops_per_caption() -> float:
    """CLIP ViT-L/14 text tower forward on 77 tokens (train/flops.py): 13 GFLOP."""
    from models.configs import TextEncoderConfig
    from train.flops import text_encode_flops_per_caption as counted

    return counted(TextEncoderConfig())


def vae_encoder_costs(stages: Sequence[Stage], costs: Sequence[StageCost], flops_model: FlopsModel,
                      hw: Hardware, encoder_img_per_s: dict[int, float] | None = None) -> list[VaeEncoderCost]:
    """The VAE encoder's cost per dataset, precomputed and in the loop, for the stages whose FLOPs leave
    it out (all of them unless --vae-online). Stages on one subset at one resolution share a precompute
    (v1-2 and v1-3), and a subset with fewer rows than the samples drawn bounds it (v1-1_512 draws 397M
    samples from laion-high-resolution's ~170M rows). `encoder_img_per_s` (resolution -> the encoder's
    forward img/s per GPU, bench/vae_encode.py) replaces the assumption that it runs at the UNet's MFU."""
    from data.stages import STAGES

    if flops_model.vae_encode:
        return []  # counted in every image's FLOPs (a throughput measured with the encoder in the loop)
    groups: dict[tuple[str, int, bool], list[tuple[Stage, StageCost]]] = {}
    for stage, cost in zip(stages, costs):
        label = stage.dataset or f"{stage.name}'s shards"
        precomputed = "VAE encode" not in stage.online_encoders
        groups.setdefault((label, stage.resolution, precomputed), []).append((stage, cost))
    out = []
    for (label, resolution, precomputed), members in groups.items():
        samples = sum(c.images for _, c in members)
        max_rows = STAGES[label].max_rows if label in STAGES else None
        images = samples if max_rows is None else min(samples, max_rows)
        per_image = vae_encode_flops_per_image(resolution)
        unet_known = all(c.img_per_s_per_gpu for _, c in members)
        encoder_s = None
        if encoder_img_per_s and resolution in encoder_img_per_s:
            encoder_s = 1.0 / encoder_img_per_s[resolution]
        elif unet_known:
            # The encoder at the UNet step's compute MFU: its seconds per image are the step's, scaled by
            # the FLOP ratio. Stages at one resolution share a throughput.
            encoder_s = per_image / (members[0][1].img_per_s_per_gpu * members[0][1].flops_per_image)
        precompute_hours = None if encoder_s is None else images * encoder_s / 3600.0
        # In the loop it shares the step with the UNet: that needs the UNet's time too.
        loop_hours = (sum(_loop_encoder_gpu_hours(c, encoder_s, hw) for _, c in members)
                      if encoder_s is not None and unet_known else None)
        measured = bool(encoder_img_per_s and resolution in encoder_img_per_s)
        out.append(VaeEncoderCost(
            dataset=label, resolution=resolution, stages=tuple(s.name for s, _ in members), precomputed=precomputed,
            samples=samples, images=images, flops_per_image=per_image, throughput="measured" if measured else "assumed",
            precompute_gpu_hours=precompute_hours, loop_gpu_hours=loop_hours))
    return out


def _loop_encoder_gpu_hours(c: StageCost, encoder_s_per_image: float, hw: Hardware) -> float:
    """GPU-hours the encoder adds to a stage's steps: each step is max(compute, network) long, and the
    encoder lengthens compute only."""
    compute_s = c.compute_ms_per_step / 1e3
    encoder_s = encoder_s_per_image * c.global_batch / hw.world_size
    network_s = c.network_ms_per_step / 1e3
    extra_s = max(compute_s + encoder_s, network_s) - max(compute_s, network_s)
    return c.steps * extra_s * hw.world_size / 3600.0
