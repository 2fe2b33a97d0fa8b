"""The original `.ckpt` layout (against the key/shape file derived from the CompVis code) and the
conversion command, with round trips between every format."""
import json
import sys
import types

import pytest
import torch

from models.adapters import ldm_checkpoint as ldm
from models.adapters.keys import KeyMismatchError
from models.configs import sd_v1, tiny
from models.stable_diffusion import build_models, ldm_state_dict, load_ldm_checkpoint, save_ldm_checkpoint
from tools import convert


def _layout(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def _reference(reference_layout, variant_prefix):
    (variant,) = [v for k, v in reference_layout["file_variants"].items() if k.startswith(variant_prefix)]
    out = {}
    for group in variant["groups"]:
        out.update(reference_layout["groups"][group])
    assert len(out) == variant["n_keys"]
    return out


def test_full_size_layout_matches_original_files(reference_layout):
    m = build_models(sd_v1(), "meta")
    counts = {name: sum(p.numel() for p in getattr(m, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert counts == reference_layout["param_counts"]

    ema = m.unet.state_dict()
    full = ldm_state_dict(m, unet_ema=ema)
    assert _layout(full) == _reference(reference_layout, "sd-v1-N-full-ema")
    ema_only = ldm_state_dict(m, ema_only=True, unet_ema=ema)
    assert _layout(ema_only) == _reference(reference_layout, "sd-v1-N.ckpt")
    for key, dtype in reference_layout["dtypes_non_float32"].items():
        assert str(full[key].dtype) == f"torch.{dtype}", key
    assert all(v.dtype == torch.float32 for k, v in full.items() if k not in reference_layout["dtypes_non_float32"])


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    m = build_models(tiny())
    m.unet_ema = {k: v + 0.5 for k, v in m.unet.state_dict().items()}  # distinguishable from the raw weights
    m.global_step = 1234
    return m


def _assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, tiny_models, suffix):
    path = tmp_path / f"model{suffix}"
    save_ldm_checkpoint(path, tiny_models)
    back = load_ldm_checkpoint(path, tiny())
    _assert_same(back.unet.state_dict(), tiny_models.unet.state_dict())
    _assert_same(back.vae.state_dict(), tiny_models.vae.state_dict())
    _assert_same(back.text_encoder.state_dict(), tiny_models.text_encoder.state_dict())
    _assert_same(back.unet_ema, tiny_models.unet_ema)
    assert back.global_step == 1234


def test_file_is_what_the_original_loader_reads(tmp_path, tiny_models):
    path = tmp_path / "model.ckpt"
    save_ldm_checkpoint(path, tiny_models)
    pl_sd = torch.load(path, map_location="cpu", weights_only=True)  # ldm: pl_sd["state_dict"], pl_sd["global_step"]
    assert set(pl_sd) == {"state_dict", "global_step"} and pl_sd["global_step"] == 1234
    sd = pl_sd["state_dict"]
    assert torch.equal(sd[ldm.POSITION_IDS], torch.arange(77)[None])
    assert sd["model_ema.num_updates"].dtype == torch.int32
    assert torch.equal(sd["model_ema.diffusion_modelinput_blocks00weight"],
                       tiny_models.unet_ema["input_blocks.0.0.weight"])


def test_loads_without_position_ids_and_lists_bad_keys(tmp_path, tiny_models):
    sd = ldm_state_dict(tiny_models)
    del sd[ldm.POSITION_IDS]
    ldm.write_checkpoint(tmp_path / "a.ckpt", sd, 7)
    assert load_ldm_checkpoint(tmp_path / "a.ckpt", tiny()).global_step == 7

    del sd["first_stage_model.quant_conv.weight"]
    sd["cond_stage_model.transformer.text_model.extra.weight"] = torch.zeros(1)
    ldm.write_checkpoint(tmp_path / "b.ckpt", sd, 7)
    with pytest.raises(KeyMismatchError) as err:
        load_ldm_checkpoint(tmp_path / "b.ckpt", tiny())
    assert "first_stage_model.quant_conv.weight" in str(err.value)
    assert "cond_stage_model.transformer.text_model.extra.weight" in str(err.value)


def test_wrong_architecture_is_a_clear_error(tmp_path, tiny_models):
    save_ldm_checkpoint(tmp_path / "tiny.ckpt", tiny_models)
    with pytest.raises(KeyMismatchError, match="--arch tiny"):
        load_ldm_checkpoint(tmp_path / "tiny.ckpt", sd_v1())


class Payload:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"state_dict": {}, "callbacks": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to load"):
        ldm.read_checkpoint(tmp_path / "evil.ckpt")


def test_lightning_callback_state_loads_without_lightning(tmp_path, tiny_models, monkeypatch):
    """Lightning checkpoints may carry a pickled ModelCheckpoint; it is read as inert data."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = 0.5

    ModelCheckpoint.__module__ = module.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    sd = ldm_state_dict(tiny_models)
    torch.save({"state_dict": sd, "global_step": 3, "callbacks": {ModelCheckpoint: ModelCheckpoint()}},
               tmp_path / "pl.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # loading must not need Lightning
    loaded, step = ldm.read_checkpoint(tmp_path / "pl.ckpt")
    assert step == 3 and set(loaded) == set(sd)


def _convert(*args):
    assert convert.main([str(a) for a in args]) == 0


def test_convert_round_trips_are_exact(tmp_path, tiny_models):
    src = tmp_path / "full-ema.ckpt"
    save_ldm_checkpoint(src, tiny_models)
    original = torch.load(src, weights_only=True)["state_dict"]

    _convert(src, tmp_path / "copy.safetensors", "--arch", "tiny")
    _convert(tmp_path / "copy.safetensors", tmp_path / "copy.ckpt", "--arch", "tiny")
    _assert_same(torch.load(tmp_path / "copy.ckpt", weights_only=True)["state_dict"], original)

    # EMA-only file through diffusers and back: the EMA weights end up in model.diffusion_model.*
    _convert(src, tmp_path / "ema.ckpt", "--ema", "--arch", "tiny")
    _convert(tmp_path / "ema.ckpt", tmp_path / "pipe", "--arch", "tiny")
    _convert(tmp_path / "pipe", tmp_path / "back.ckpt")
    ema_only = torch.load(tmp_path / "ema.ckpt", weights_only=True)["state_dict"]
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("model_ema.diffusion") for k in ema_only)
    # A diffusers folder carries no EMA bookkeeping, so none comes back (none is made up either).
    assert not any(k.startswith("model_ema.") for k in back)
    _assert_same(back, {k: v for k, v in ema_only.items() if k not in (ldm.EMA_DECAY, ldm.EMA_NUM_UPDATES)})
    assert torch.equal(ema_only["model.diffusion_model.out.2.bias"], tiny_models.unet_ema["out.2.bias"])


def test_convert_reads_a_trainer_export_folder_and_its_architecture(tmp_path, tiny_models):
    """`<run.dir>/export` or `exports/step-N` as the source: its model.ckpt, built as the arch its export.json
    names. It used to be taken for a diffusers folder ("missing unet/config.json")."""
    export = tmp_path / "exports" / "step-6"
    export.mkdir(parents=True)
    save_ldm_checkpoint(export / "model.ckpt", tiny_models)
    (export / "export.json").write_text(json.dumps({"step": 6, "arch": "tiny", "stage": "mini_test"}))
    _convert(export, tmp_path / "out.safetensors")  # no --arch
    _convert(tmp_path / "out.safetensors", tmp_path / "back.ckpt", "--arch", "tiny")
    _assert_same(torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"],
                 torch.load(export / "model.ckpt", weights_only=True)["state_dict"])
    with pytest.raises(SystemExit):  # an --arch that contradicts the export is refused with the fix
        convert.main([str(export), str(tmp_path / "x.safetensors"), "--arch", "sd-v1"])


@pytest.mark.parametrize("flag,expect", [(None, "ema"), ("--ema", "ema"), ("--no-ema", "raw")])
def test_convert_to_diffusers_chooses_ema_as_asked(tmp_path, tiny_models, flag, expect):
    from safetensors.torch import load_file

    src = tmp_path / "full-ema.ckpt"
    save_ldm_checkpoint(src, tiny_models)
    _convert(src, tmp_path / "pipe", "--arch", "tiny", *([flag] if flag else []))
    unet = load_file(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    want = tiny_models.unet_ema if expect == "ema" else tiny_models.unet.state_dict()
    assert torch.equal(unet["conv_in.weight"], want["input_blocks.0.0.weight"])


def _refused(capsys, *args) -> str:
    """convert's error for wrong inputs: exit 2 and a message, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        _convert(*args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_no_ema_on_single_copy_file_is_refused(tmp_path, tiny_models, capsys):
    src = tmp_path / "ema.ckpt"
    save_ldm_checkpoint(src, tiny_models, ema_only=True)
    assert "single copy" in _refused(capsys, src, tmp_path / "pipe", "--arch", "tiny", "--no-ema")


def test_convert_refuses_a_missing_file_and_another_architecture(tmp_path, tiny_models, capsys):
    assert "no checkpoint file at" in _refused(capsys, tmp_path / "missing.ckpt", tmp_path / "pipe")
    src = tmp_path / "tiny.ckpt"
    save_ldm_checkpoint(src, tiny_models)
    err = _refused(capsys, src, tmp_path / "pipe", "--arch", "mini")  # strict load: other keys
    assert "does not match the model" in err and "Traceback" not in err


def test_diffusers_pipeline_loads_our_folder(tmp_path, tiny_models):
    """diffusers itself reads the folder we write, and its UNet computes what ours does."""
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "m.ckpt"
    save_ldm_checkpoint(src, tiny_models, ema_only=False)
    _convert(src, tmp_path / "pipe", "--arch", "tiny", "--no-ema")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([42]), torch.randn(1, 77, 32)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = tiny_models.unet.eval()(x, t, ctx)
        ids = pipe.tokenizer("a red square", padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.allclose(pipe.text_encoder(ids).last_hidden_state, tiny_models.text_encoder(ids), atol=1e-6)
    assert torch.allclose(theirs, ours, atol=1e-5)


def _assert_same_unordered(a: dict, b: dict):
    """As _assert_same, for a safetensors file read back (safetensors stores the keys sorted)."""
    assert set(a) == set(b)
    _assert_same({k: a[k] for k in b}, b)


def test_convert_writes_and_reads_the_format_asked_for_whatever_the_name(tmp_path, tiny_models):
    """--to/--from decide the format; the suffix only guesses it. `--to safetensors out.pt` used to print
    "(safetensors)" and write a torch pickle, and `--from safetensors` on a .sft file crashed."""
    from safetensors.torch import load_file

    src = tmp_path / "full-ema.ckpt"
    save_ldm_checkpoint(src, tiny_models)
    original = torch.load(src, weights_only=True)["state_dict"]
    _convert(src, tmp_path / "out.pt", "--to", "safetensors", "--arch", "tiny")
    _assert_same_unordered(load_file(str(tmp_path / "out.pt")), original)  # safetensors' own reader
    (tmp_path / "out.pt").rename(tmp_path / "out.sft")
    _convert(tmp_path / "out.sft", tmp_path / "back.bin", "--from", "safetensors", "--to", "ckpt", "--arch", "tiny")
    _assert_same(torch.load(tmp_path / "back.bin", weights_only=True)["state_dict"], original)


def test_ema_only_file_without_ema_bookkeeping_round_trips_unchanged(tmp_path, tiny_models):
    """A pruned EMA-only file has no model_ema.decay/num_updates; converting it must not invent them (they
    used to come back as 0.9999 and 0). Files that have them keep their values."""
    sd = ldm_state_dict(tiny_models, ema_only=True)
    pruned = {k: v for k, v in sd.items() if k not in (ldm.EMA_DECAY, ldm.EMA_NUM_UPDATES)}
    ldm.write_checkpoint(tmp_path / "pruned.ckpt", pruned, 5)
    _convert(tmp_path / "pruned.ckpt", tmp_path / "back.ckpt", "--arch", "tiny")
    _assert_same(torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"], pruned)

    sd[ldm.EMA_DECAY], sd[ldm.EMA_NUM_UPDATES] = torch.tensor(0.9998), torch.tensor(1234, dtype=torch.int32)
    ldm.write_checkpoint(tmp_path / "kept.ckpt", sd, 5)
    _convert(tmp_path / "kept.ckpt", tmp_path / "kept_back.safetensors", "--arch", "tiny")
    _assert_same_unordered(ldm.read_checkpoint(tmp_path / "kept_back.safetensors")[0], sd)


def _rounded(sd: dict, dtype: torch.dtype, only=None) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() and (only is None or k in only) else v for k, v in sd.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_file_loads_and_another_schedule_is_still_refused(tmp_path, tiny_models, dtype):
    """A file saved in float16/bfloat16 holds SD v1's schedule rounded; it used to be refused as another
    schedule (compared at 1e-5). A schedule that really differs is refused and said to be no rounding."""
    from models.configs import ScheduleConfig
    from models.schedule import schedule_buffers

    sd = _rounded(ldm_state_dict(tiny_models), dtype)
    ldm.write_checkpoint(tmp_path / "half.ckpt", sd, 9)
    back = load_ldm_checkpoint(tmp_path / "half.ckpt", tiny())
    assert torch.equal(back.unet.state_dict()["out.2.weight"], sd["model.diffusion_model.out.2.weight"].float())

    other = schedule_buffers(ScheduleConfig(linear_start=0.0001, linear_end=0.02))  # DDPM's, not SD's
    sd.update(_rounded(other, dtype))
    ldm.write_checkpoint(tmp_path / "other.ckpt", sd, 9)
    with pytest.raises(ValueError, match=f"stores them in {str(dtype)[6:]}.*not rounding") as err:
        load_ldm_checkpoint(tmp_path / "other.ckpt", tiny())
    assert "betas 0.0001 to 0.02" in str(err.value) and "schedule.linear_start" not in str(err.value)
    sd.update(other)  # float32: a real difference, with no word about precision
    ldm.write_checkpoint(tmp_path / "other32.ckpt", sd, 9)
    with pytest.raises(ValueError, match="noise schedule differs") as err:
        load_ldm_checkpoint(tmp_path / "other32.ckpt", tiny())
    assert "rounding" not in str(err.value)


def test_file_without_schedule_buffers_gets_the_architectures(tmp_path, tiny_models, capsys):
    """diffusers' convert_diffusers_to_original_stable_diffusion.py writes only the UNet, VAE and text
    encoder: such a file loads, with SD v1's schedule and a note; a file with only some buffers is refused."""
    from models.schedule import BUFFER_NAMES, DDPMSchedule

    sd = ldm_state_dict(tiny_models, ema_only=True)
    bare = {k: v for k, v in sd.items() if k not in BUFFER_NAMES and not k.startswith("model_ema.")}
    ldm.write_checkpoint(tmp_path / "bare.safetensors", bare, None)
    back = load_ldm_checkpoint(tmp_path / "bare.safetensors", tiny())
    assert "holds no noise-schedule buffers" in capsys.readouterr().err
    _assert_same(back.schedule.state_dict(), DDPMSchedule().state_dict())
    _assert_same(back.unet.state_dict(), tiny_models.unet_ema)
    # Converted, the file gets the buffers the released files hold.
    _convert(tmp_path / "bare.safetensors", tmp_path / "full.ckpt", "--arch", "tiny")
    full = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    assert list(full)[:12] == list(BUFFER_NAMES)
    _assert_same({k: full[k] for k in BUFFER_NAMES}, {k: sd[k] for k in BUFFER_NAMES})

    ldm.write_checkpoint(tmp_path / "partial.ckpt", {**bare, "betas": sd["betas"]}, None)
    with pytest.raises(ValueError, match="holds 1 of the 12 noise-schedule buffers"):
        load_ldm_checkpoint(tmp_path / "partial.ckpt", tiny())


def test_wrong_architecture_names_the_right_one_in_one_line(tmp_path, tiny_models, capsys):
    from tools import sample

    save_ldm_checkpoint(tmp_path / "tiny.ckpt", tiny_models)
    for tool, args in ((sample.main, ["--prompt", "x", "--device", "cpu", "--out", str(tmp_path)]),  # sd-v1
                       (convert.main, [str(tmp_path / "x.safetensors"), "--arch", "mini"])):
        with pytest.raises(SystemExit) as exit_:
            tool([str(tmp_path / "tiny.ckpt"), *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        (line,) = [x for x in err.splitlines() if "error:" in x]
        assert line.endswith("its weights are those of --arch tiny")


def _diffusers_fp16_folder(tmp_path, tiny_models):
    """Our tiny pipeline, re-saved by diffusers itself in float16 with variant="fp16" (what fp16 releases ship)."""
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "m.ckpt"
    save_ldm_checkpoint(src, tiny_models)
    _convert(src, tmp_path / "pipe", "--arch", "tiny", "--no-ema")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    pipe.to(torch.float16).save_pretrained(str(tmp_path / "fp16"), variant="fp16")
    return tmp_path / "fp16"


def test_diffusers_fp16_variant_folder_loads(tmp_path, tiny_models):
    from diffusers import StableDiffusionPipeline

    from models.adapters import diffusers_folder

    folder = _diffusers_fp16_folder(tmp_path, tiny_models)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    theirs = StableDiffusionPipeline.from_pretrained(str(folder), variant="fp16", local_files_only=True)
    _, parts = diffusers_folder.load_diffusers(folder)
    half = {k: v.half() for k, v in tiny_models.unet.state_dict().items()}
    _assert_same(parts["unet"], half)
    _assert_same(parts["vae"], {k: v.half() for k, v in tiny_models.vae.state_dict().items()})
    assert torch.equal(parts["unet"]["input_blocks.0.0.weight"], theirs.unet.state_dict()["conv_in.weight"])
    _convert(folder, tmp_path / "from_fp16.ckpt")  # and through the tools
    assert torch.load(tmp_path / "from_fp16.ckpt", weights_only=True)["state_dict"][
        "model.diffusion_model.out.2.weight"].dtype == torch.float16

    # The full-precision file wins when both are there; two variants and no plain file is ambiguous.
    unet = folder / "unet"
    fp16 = diffusers_folder.load_file(str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    plain = {k: v.float() for k, v in fp16.items()}
    diffusers_folder.save_file(plain, str(unet / "diffusion_pytorch_model.safetensors"))
    assert diffusers_folder.load_diffusers(folder)[1]["unet"]["out.2.weight"].dtype == torch.float32
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(ValueError, match="fp16.safetensors and diffusion_pytorch_model.bf16.safetensors"):
        diffusers_folder.load_diffusers(folder)
    for f in unet.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="also accepted: diffusion_pytorch_model.fp16.safetensors"):
        diffusers_folder.load_diffusers(folder)
