"""SD v1's frozen CLIP ViT-L/14 text tower (CompVis `FrozenCLIPEmbedder`): the conditioning is the
last hidden state (after the final layer norm) of all 77 positions, never the pooled output.

The module is laid out so that its state-dict keys are the original checkpoint's keys minus the
`cond_stage_model.` prefix: `transformer.text_model.<transformers CLIPTextModel key>`. transformers 5's
`CLIPTextModel` has no `text_model` level of its own, so a tiny container module supplies it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from models.adapters.keys import KeyMismatchError
from models.configs import TextEncoderConfig


# A CLIPModel's keys that are not its text tower's.
_OTHER_TOWER = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


class _Transformer(nn.Module):
    """Only there to put the `text_model.` level into the key names (the original
    FrozenCLIPEmbedder.transformer was a transformers 4.19 CLIPTextModel, which had it)."""

    def __init__(self, text_model: CLIPTextModel):
        super().__init__()
        self.text_model = text_model


class FrozenCLIPTextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, text_model: CLIPTextModel | None = None):
        super().__init__()
        self.cfg = cfg
        # Under `with torch.device("meta"):` this allocates nothing (used to count parameters and
        # to derive the expected key/shape layout of full-size checkpoints).
        self.transformer = _Transformer(text_model if text_model is not None else CLIPTextModel(cfg.to_transformers()))
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenCLIPTextEncoder":
        # Frozen: stays in eval mode whatever the caller asks (the original replaced `train` with a
        # no-op for the same reason), so an outer model.train() cannot turn on dropout here.
        return super().train(False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: LongTensor [B, 77] -> last_hidden_state [B, 77, hidden_size].
        No attention mask, as in SD v1: padding positions are attended causally like any token."""
        return self.transformer.text_model(input_ids=input_ids).last_hidden_state

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "FrozenCLIPTextEncoder":
        """Loads a local transformers/diffusers `text_encoder/` folder (config.json + weights), or a whole
        CLIPModel's folder (openai/clip-vit-large-patch14): its text tower, as FrozenCLIPEmbedder took it."""
        path = Path(path)
        if not (path / "config.json").is_file():
            hint = f"; did you mean {path / 'text_encoder'}?" if (path / "text_encoder" / "config.json").is_file() else ""
            raise FileNotFoundError(f"{path}: not a text_encoder folder (no config.json there){hint}")
        # transformers 5 builds the model under torch.device("meta") with torch.linspace swapped for a CPU
        # default; torch caches the functions a device context redirects on its first use, so if that first
        # use is this one, the swapped linspace is cached and every later `with torch.device(...)` leaves
        # linspace on the CPU (build_models(cfg, "meta") then fails in the schedule). Use it once before.
        with torch.device("cpu"):
            torch.empty(0)
        model, info = CLIPTextModel.from_pretrained(path, local_files_only=True, dtype=dtype, output_loading_info=True)
        # from_pretrained only warns about missing keys and initialises them at random; we refuse. Of a whole
        # CLIPModel only the image tower and the two projections are left out.
        info["unexpected_keys"] = [k for k in info.get("unexpected_keys", ()) if not k.startswith(_OTHER_TOWER)]
        bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if bad or info.get("error_msgs"):
            raise KeyMismatchError(f"{path}: weights do not match the config: {bad or info['error_msgs']}")
        return cls(text_encoder_config_from_transformers(model.config), text_model=model)

    def save_pretrained_dir(self, path: str | os.PathLike) -> Path:
        """Writes config.json + model.safetensors in the layout of published SD v1 diffusers folders
        (`text_model.`-prefixed keys, which transformers 4 and 5 both load)."""
        import json

        from safetensors.torch import save_file

        from models.adapters.diffusers_text import diffusers_config, to_diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = to_diffusers(self.state_dict(), self.cfg)
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        config = diffusers_config(self.cfg) | {"torch_dtype": dtype}
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"),
                  metadata={"format": "pt"})
        return path


def text_encoder_config_from_transformers(hf_config: CLIPTextConfig) -> TextEncoderConfig:
    # TextEncoderConfig has no field for these, so a config that changes them would silently
    # build a different model; refuse instead.
    if abs(hf_config.layer_norm_eps - 1e-5) > 1e-12:
        raise ValueError(f"text encoder layer_norm_eps={hf_config.layer_norm_eps}: only 1e-5 (CLIP) is supported")
    fields = TextEncoderConfig.__dataclass_fields__
    return TextEncoderConfig(**{name: getattr(hf_config, name) for name in fields})


@torch.no_grad()
def encode_prompts(tokenizer, encoder: FrozenCLIPTextEncoder, prompts: str | Sequence[str]) -> torch.Tensor:
    """Prompts -> conditioning [B, 77, hidden] on the encoder's device and dtype."""
    ids = tokenizer(prompts, context_length=encoder.cfg.max_position_embeddings)
    return encoder(ids.to(next(encoder.parameters()).device))
