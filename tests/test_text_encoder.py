"""The frozen CLIP text encoder: SD v1 key/shape layout, equivalence with transformers' CLIPTextModel
through the diffusers adapter, strict key checking."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from models.adapters.diffusers_text import config_from_diffusers, diffusers_config, from_diffusers, to_diffusers
from models.adapters.keys import KeyMismatchError
from models.configs import TextEncoderConfig, tiny
from models.text_encoder import FrozenCLIPTextEncoder, encode_prompts, text_encoder_config_from_transformers

REFERENCE = Path(__file__).parent / "assets" / "sd_v1_state_dict.json"
POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    return FrozenCLIPTextEncoder(tiny().text)


def _ids(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (batch, 77), generator=g)
    ids[:, 0], ids[:, 20:] = 49406, 49407  # BOS ... EOS + EOS padding, as the tokenizer makes them
    return ids


def test_full_size_layout_matches_sd_v1_checkpoint():
    with torch.device("meta"):
        enc = FrozenCLIPTextEncoder(TextEncoderConfig())
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480
    reference = json.loads(REFERENCE.read_text())["groups"]["text_encoder"]
    assert POS in reference and len(reference) == 197
    expected = {k: tuple(v) for k, v in reference.items() if k != POS}
    ours = {"cond_stage_model." + k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert ours == expected


def test_matches_transformers_model_loaded_from_adapter_output(tiny_encoder, tmp_path):
    tiny_encoder.save_pretrained_dir(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert all(k.startswith("text_model.") for k in saved) and "text_model.embeddings.position_ids" not in saved
    ref, info = CLIPTextModel.from_pretrained(tmp_path, local_files_only=True, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    ids = _ids()
    with torch.no_grad():
        ours, theirs = tiny_encoder(ids), ref.eval()(input_ids=ids).last_hidden_state
    assert ours.shape == (2, 77, 32) and ours.dtype == torch.float32
    assert ((ours - theirs).norm() / theirs.norm()).item() <= 1e-5
    # ... and our loader reads the folder back to the same weights.
    again = FrozenCLIPTextEncoder.from_pretrained_dir(tmp_path)
    assert again.cfg == tiny_encoder.cfg
    assert all(torch.equal(v, tiny_encoder.state_dict()[k]) for k, v in again.state_dict().items())


def test_adapter_round_trip_is_exact(tiny_encoder):
    cfg = tiny_encoder.cfg
    sd = tiny_encoder.state_dict()
    back = from_diffusers(to_diffusers(sd, cfg), cfg)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert config_from_diffusers(diffusers_config(cfg)) == cfg


def test_from_diffusers_accepts_both_prefixes_and_position_ids(tiny_encoder):
    cfg = tiny_encoder.cfg
    published = to_diffusers(tiny_encoder.state_dict(), cfg)
    bare = {k.removeprefix("text_model."): v for k, v in published.items()}  # transformers 5 save_pretrained
    pos = torch.arange(77).unsqueeze(0)
    for state in (published, bare, published | {"text_model.embeddings.position_ids": pos},
                  bare | {"embeddings.position_ids": pos}):
        assert from_diffusers(state, cfg).keys() == tiny_encoder.state_dict().keys()
    bad = pos.clone()
    bad[0, 5] = 6
    with pytest.raises(ValueError, match="position_ids"):
        from_diffusers(published | {"text_model.embeddings.position_ids": bad}, cfg)
    with pytest.raises(KeyMismatchError, match="mixed"):
        from_diffusers(published | {"embeddings.extra.weight": torch.zeros(1)}, cfg)


def test_extra_or_missing_key_raises_and_names_it(tiny_encoder):
    cfg = tiny_encoder.cfg
    sd = dict(tiny_encoder.state_dict())
    with pytest.raises(KeyMismatchError, match="transformer.text_model.encoder.layers.9.mlp.fc1.weight"):
        to_diffusers(sd | {"transformer.text_model.encoder.layers.9.mlp.fc1.weight": torch.zeros(1)}, cfg)
    missing = "transformer.text_model.final_layer_norm.bias"
    with pytest.raises(KeyMismatchError, match=missing):
        to_diffusers({k: v for k, v in sd.items() if k != missing}, cfg)
    published = to_diffusers(sd, cfg)
    with pytest.raises(KeyMismatchError, match="text_model.bogus"):
        from_diffusers(published | {"text_model.bogus": torch.zeros(1)}, cfg)
    with pytest.raises(KeyMismatchError, match="shape"):
        from_diffusers(published | {"text_model.final_layer_norm.bias": torch.zeros(33)}, cfg)


def test_from_pretrained_dir_refuses_incomplete_or_missing_folders(tiny_encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        FrozenCLIPTextEncoder.from_pretrained_dir(tmp_path / "nowhere")
    tiny_encoder.save_pretrained_dir(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_model.final_layer_norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyMismatchError, match="final_layer_norm"):
        FrozenCLIPTextEncoder.from_pretrained_dir(tmp_path)


def test_frozen_and_always_eval(tiny_encoder):
    parent = torch.nn.Sequential(tiny_encoder)
    parent.train()
    assert parent.training and not tiny_encoder.training
    assert not any(m.training for m in tiny_encoder.modules())
    assert not any(p.requires_grad for p in tiny_encoder.parameters())


def test_config_helpers_and_encode_prompts(tiny_encoder):
    assert text_encoder_config_from_transformers(TextEncoderConfig().to_transformers()) == TextEncoderConfig()
    with pytest.raises(ValueError, match="model_type"):
        config_from_diffusers({"model_type": "clip"})
    with pytest.raises(ValueError, match="layer_norm_eps"):
        config_from_diffusers(diffusers_config(tiny().text) | {"layer_norm_eps": 1e-6})

    class FakeTokenizer:  # the real one is tested in test_tokenizer.py
        def __call__(self, prompts, context_length=77):
            return _ids(len(prompts))

    out = encode_prompts(FakeTokenizer(), tiny_encoder, ["a", "b", "c"])
    assert out.shape == (3, 77, 32) and not out.requires_grad


def test_miniature_text_encoder_tells_words_apart_where_clip_init_does_not():
    """The reason for mini()'s text_token_init_std: at the colour word's position, the features of two
    captions that differ only in that word are nearly equal with CLIP's init, clearly apart with 0.5."""
    from models.configs import mini
    from models.stable_diffusion import build_models
    from models.text_encoder import encode_prompts
    from models.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    position = 2  # <start> a red ...
    cosines = {}
    for name, cfg in {"clip-init": replace(mini(), text_token_init_std=None), "mini": mini()}.items():
        torch.manual_seed(0)
        feats = encode_prompts(tokenizer, build_models(cfg).text_encoder,
                               ["a red circle on a white background", "a blue circle on a white background"])
        cosines[name] = torch.nn.functional.cosine_similarity(feats[0, position], feats[1, position], dim=0).item()
    assert cosines["clip-init"] > 0.8 and cosines["mini"] < 0.3, cosines
