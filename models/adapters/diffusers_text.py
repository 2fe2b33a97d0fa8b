"""Text encoder <-> the `text_encoder/` folder of a diffusers pipeline (a transformers CLIPTextModel).

Key layouts:
  ours:      transformer.text_model.<k>       (original checkpoint minus `cond_stage_model.`)
  published: text_model.<k>                   (every SD v1 diffusers repo; what transformers 4 saves)
  tf5 save:  <k>                              (transformers 5's save_pretrained drops `text_model.`)
where <k> is e.g. `embeddings.token_embedding.weight`. transformers 5 loads both of the last two, while
transformers 4 and non-transformers readers only know `text_model.`, so that is what we write.
Older files also carry `text_model.embeddings.position_ids` (a buffer, arange(77)); we accept it when
it holds exactly that and never write it (it is non-persistent in transformers >= 4.31).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from transformers import CLIPTextConfig

from models.adapters.keys import KeyMismatchError, check_shapes
from models.configs import TextEncoderConfig

OURS = "transformer.text_model."
PUBLISHED = "text_model."
POSITION_IDS = "embeddings.position_ids"


@lru_cache(maxsize=8)
def _expected_shapes(cfg: TextEncoderConfig) -> dict[str, torch.Size]:
    """Our module's key -> shape, from a copy built on the meta device (no memory, no init cost)."""
    from models.text_encoder import FrozenCLIPTextEncoder

    with torch.device("meta"):
        module = FrozenCLIPTextEncoder(cfg)
    return {k: v.shape for k, v in module.state_dict().items()}


def to_diffusers(state: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    check_shapes(_expected_shapes(cfg), state, "text encoder (ours -> diffusers)")
    return {PUBLISHED + k.removeprefix(OURS): v for k, v in state.items()}


def _check_position_ids(value: torch.Tensor, cfg: TextEncoderConfig) -> None:
    n = cfg.max_position_embeddings
    # Some re-saved checkpoints hold float or corrupted position ids, which shift every token's
    # position embedding; refuse rather than drop them silently.
    ok = value.numel() == n and value.shape in ((1, n), (n,)) and torch.equal(
        value.detach().cpu().reshape(-1).to(torch.float64), torch.arange(n, dtype=torch.float64))
    if not ok:
        raise ValueError(f"text encoder position_ids must be arange({n}) of shape [1, {n}], "
                         f"got shape {tuple(value.shape)} {value.dtype}")


def from_diffusers(state: dict[str, torch.Tensor], cfg: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Accepts keys with or without `text_model.` (not a mix), with or without position_ids."""
    prefixed = [k.startswith(PUBLISHED) for k in state]
    if any(prefixed) and not all(prefixed):
        stray = sorted(k for k, p in zip(state, prefixed) if not p)
        raise KeyMismatchError(f"text encoder (diffusers -> ours): keys with and without '{PUBLISHED}' mixed; "
                               f"without: {stray[:10]}")
    out = {}
    for k, v in state.items():
        bare = k.removeprefix(PUBLISHED)
        if bare == POSITION_IDS:
            _check_position_ids(v, cfg)
            continue
        out[OURS + bare] = v
    expected = _expected_shapes(cfg)
    check_shapes(expected, out, "text encoder (diffusers -> ours)")
    return {k: out[k] for k in expected}  # our state_dict() order (the checkpoint's), not the file's


def diffusers_config(cfg: TextEncoderConfig) -> dict:
    """config.json of the text_encoder folder (fields as in published SD v1 repos)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "projection_dim": cfg.projection_dim,
        "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def config_from_diffusers(d: dict) -> TextEncoderConfig:
    """Fields missing from `d` take transformers' CLIPTextConfig defaults, as they would on load."""
    from models.text_encoder import text_encoder_config_from_transformers

    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"text encoder config has model_type={d['model_type']!r}, expected 'clip_text_model'")
    return text_encoder_config_from_transformers(CLIPTextConfig.from_dict(d))
