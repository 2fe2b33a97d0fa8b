"""Config composition and the recipe's arithmetic (no processes started)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import (ConfigError, TrainConfig, accumulation_steps, check_frozen_sources, loader_config,
                          stage_seed, validate)
from train.ema import EMA
from train.lr import warmup_multiplier
from train.main import CONF_DIR, to_dataclass

STAGES = sorted(p.stem for p in (Path(CONF_DIR) / "stage").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (Path(CONF_DIR) / "cluster").glob("*.yaml"))


def _compose(*overrides) -> TrainConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    # Settings a user must give (the data location) get placeholders here.
    for key in OmegaConf.missing_keys(cfg):
        OmegaConf.update(cfg, key, "/placeholder")
    return to_dataclass(cfg)


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("stage", STAGES)
def test_every_shipped_config_composes_and_validates(stage, cluster):
    cfg = _compose(f"stage={stage}", f"cluster={cluster}")
    world = cfg.cluster.nodes * cfg.cluster.gpus_per_node
    if stage.startswith("mini"):
        # Toy stages (batch 8-32) are for the local cluster; elsewhere the refusal must say what to change.
        try:
            validate(cfg, world)
        except ConfigError as err:
            assert cluster != "local" and "global_batch" in str(err), err
    else:
        validate(cfg, world)  # the real stages run on every shipped cluster


def test_reference_cluster_reproduces_the_original_batch():
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8")
    assert cfg.cluster.nodes * cfg.cluster.gpus_per_node == 256
    # The model card's 32 nodes x 8 GPUs x 2 accumulation x 4 per GPU = 2048, as 8 per GPU in one pass.
    assert validate(cfg, 256) == 1 and cfg.stage.micro_batch == 8
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (1e-4, 0.01, 10_000)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.999, 1e-8)


def test_sd_stages_run_compiled_without_checkpointing_and_reduce_in_fp32():
    """8 images per GPU fit without activation checkpointing (it cost 25% of the step on an H200), the
    blocks compiled; gradients cross the network in fp32 as in the original, FSDP2 keeps the gathered
    parameters for the backward, and cuDNN picks its convolution algorithms by timing them."""
    for stage in ("v1-1_256", "v1-1_512", "v1-2", "v1-3"):
        cfg = _compose(f"stage={stage}", "cluster=reference_32x8")
        assert cfg.model.activation_checkpointing == "none" and cfg.parallel.compile, stage
        assert cfg.parallel.reduce_dtype == "fp32" and not cfg.parallel.reshard_after_forward, stage
        assert cfg.parallel.cudnn_benchmark and cfg.parallel.channels_last, stage


def test_sd_stages_read_latents_where_they_repeat_images():
    """v1-1_256 draws a fifth of laion2B-en once: images, the VAE encoder in the loop. From v1-1_512 on each
    image comes round more than twice: precomputed latents (centre crops, as the loader takes them),
    captions still encoded in the loop."""
    v1_1_256, *later = (_compose(f"stage={s}") for s in ("v1-1_256", "v1-1_512", "v1-2", "v1-3"))
    assert not v1_1_256.stage.data.latents
    for cfg in later:
        data = cfg.stage.data
        assert data.latents and not data.context and data.crop == "center", cfg.stage.name


def test_stage_chain_is_explicit_about_what_carries_over():
    v11_512, v12, v13 = (_compose(f"stage={s}") for s in ("v1-1_512", "v1-2", "v1-3"))
    assert v11_512.stage.init.from_checkpoint.endswith("v1-1_256/export") and v11_512.stage.data.resolution == 512
    assert v11_512.stage.data.subset == "laion-high-resolution" and v11_512.stage.steps == 194_000
    assert v12.stage.init.from_checkpoint.endswith("v1-1_512/export") and v12.stage.steps == 515_000
    assert v12.stage.data.subset == "laion-improved-aesthetics" and v12.stage.data.caption_dropout == 0.0
    assert v13.stage.init.from_checkpoint.endswith("v1-2/export") and v13.stage.steps == 195_000
    assert v13.stage.data.caption_dropout == 0.1
    assert all(c.stage.init.weights and c.stage.init.ema and not c.stage.init.optimizer for c in (v11_512, v12, v13))


def test_settings_the_schema_does_not_have_are_refused_with_the_nearest():
    """Hydra's `+key=value` (its own hint for an unknown key) adds a key even to the structured config, and
    it reached the dataclass unread: `+stage.stepz=5` trained the default steps without a word. Free-form
    maps (cluster.env) still take any key."""
    with pytest.raises(ConfigError, match=r"no such setting: stage.stepz \(did you mean stage.steps\?\)"):
        _compose("+stage.stepz=5")
    with pytest.raises(ConfigError, match=r"optim.lr_typo \(optim has lr, beta1.*; foo \(the top level has backend"):
        _compose("+optim.lr_typo=1", "+foo=3")
    assert _compose("+cluster.env.NCCL_DEBUG=INFO").cluster.env["NCCL_DEBUG"] == "INFO"


def test_accumulation_is_derived_and_impossible_batches_are_refused():
    assert accumulation_steps(2048, 256, 4) == 2
    assert accumulation_steps(2048, 8, 4) == 64  # same optimisation on one node
    with pytest.raises(ConfigError, match="micro_batch in"):
        accumulation_steps(2048, 256, 3)
    with pytest.raises(ConfigError, match="world size that divides"):
        accumulation_steps(2048, 24, 4)


def test_scale_lr_is_refused_with_the_reason():
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8", "optim.scale_lr=true")
    with pytest.raises(ConfigError, match="failed to converge"):
        validate(cfg, 256)


def test_model_settings_are_checked_with_the_choices():
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8", "model.attention_backend=cudnn")
    with pytest.raises(ConfigError, match=r"model\.\* sets unet\.attention_backend='cudnn': choose one of .*sdpa-cudnn"):
        validate(cfg, 256)
    pinned = _compose("stage=v1-1_256", "cluster=reference_32x8", "model.attention_backend=sdpa-cudnn")
    validate(pinned, 256)
    assert pinned.model.sd_config().unet.attention_backend == "sdpa-cudnn"


@pytest.mark.parametrize("override, message", [
    ("checkpoint.every_steps=0", "checkpoint.every_steps=0 must be >= 1"),  # was a modulo by zero at step 1
    ("tracking.log_every=0", "tracking.log_every=0 must be >= 1"),
    ("optim.lr=-1", r"optim.lr=-1.0 must be >= 0"),  # was torch's AdamW error, after the models were built
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 must be >= 0"),  # was taken as no warmup
    ("optim.grad_clip=0", "optim.grad_clip=0.0 must be > 0, or null"),
    ("ema.max_decay=1.5", r"ema.max_decay=1.5 must be in \[0, 1\)"),  # was trained with
    ("stage.steps=-3", "stage.steps=-3 must be >= 1"),  # was a stage "finished" at once
    ("stage.global_batch=0", "stage.global_batch=0 must be >= 1"),
    ("stage.data.resolution=0", "stage.data.resolution=0 must be a positive multiple of 64"),  # was 0-px crops
    ("stage.data.max_unreadable_in_a_row=-1", r"stage.data.\* sets loader: max_unreadable_in_a_row and timeout_s"),
])
def test_numbers_out_of_range_are_refused_at_start_up(override, message):
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 256)


def test_the_loaders_failure_limits_reach_it():
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8", "stage.data.timeout_s=600",
                   "stage.data.max_unreadable_in_a_row=8")
    loader = loader_config(cfg)
    assert (loader.timeout_s, loader.max_unreadable_in_a_row) == (600, 8)


def test_local_shards_are_listed_once_per_folder_and_missing_ones_named(tmp_path):
    from data.loader import missing_local_shards
    from train.config import check_shards_exist

    for name in ("00000.tar", "00001.tar"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "00002.tar").mkdir()  # a folder is not a shard
    urls = [f"{tmp_path}/0000{i}.tar" for i in range(3)] + [f"file:{tmp_path}/00003.tar", f"{tmp_path}/x/00000.tar",
                                                             "pipe:cat /nowhere.tar"]
    assert missing_local_shards(urls) == urls[2:5]  # pipe: commands are not checked
    check_shards_exist(_compose("stage=mini_test", f"stage.data.shards='{tmp_path}/{{00000..00001}}.tar'"))
    val = _compose("stage=mini_test", f"stage.data.shards='{tmp_path}/00000.tar'", "tracking.val_every=5",
                   f"stage.data.val_shards='{tmp_path}/held/{{0..1}}.tar'")
    with pytest.raises(ConfigError, match=r"stage.data.val_shards: 2 of its 2 shards are not there \(.*held/0.tar"):
        check_shards_exist(val)
    s3 = _compose("stage=mini_test", "stage.data.shards='s3://bucket/{00000..00001}.tar'")
    with pytest.raises(ConfigError, match=r"write s3://bucket/00000.tar as 'pipe:aws s3 cp s3://bucket/00000.tar -'"):
        check_shards_exist(s3)


def test_world_size_must_match_the_cluster():
    cfg = _compose("stage=v1-1_256", "cluster=reference_32x8")
    with pytest.raises(ConfigError, match="cluster.nodes"):
        validate(cfg, 8)


def test_warmup_is_linear_from_1e6_then_constant():
    assert warmup_multiplier(0, 10_000, 1e-6) == 1e-6
    assert warmup_multiplier(5_000, 10_000, 1e-6) == pytest.approx(0.5 + 0.5e-6)
    assert warmup_multiplier(10_000, 10_000, 1e-6) == 1.0
    assert warmup_multiplier(400_000, 10_000, 1e-6) == 1.0


def test_ema_follows_litema():
    """LitEma: n += 1; decay = min(d, (1 + n) / (10 + n)); shadow -= (1 - decay) * (shadow - param)."""
    torch.manual_seed(0)
    p = {"w": torch.randn(5)}
    ema = EMA(p, max_decay=0.9999)
    reference = p["w"].clone()
    n = 0
    for _ in range(30):
        p = {"w": p["w"] + torch.randn(5) * 0.1}
        n += 1
        decay = min(0.9999, (1 + n) / (10 + n))
        reference = reference - (1 - decay) * (reference - p["w"])
        ema.update(p)
    assert ema.num_updates == 30
    assert torch.allclose(ema.shadow["w"], reference, atol=1e-6)


def test_an_export_without_its_checkpoint_says_so_before_building_anything(tmp_path):
    from train.checkpoint import _prune
    from train.export import export_checkpoint

    cfg = _compose("stage=mini_test", "stage.data.shards=x.tar", f"run.dir={tmp_path}", "checkpoint.export=latest")
    with pytest.raises(ConfigError, match=r"no checkpoint in .*checkpoints: give the stage's run.dir"):
        export_checkpoint(cfg, None, {})
    assert not (tmp_path / "checkpoints").exists()
    for step in (3, 6, 9, 12, 15):
        (tmp_path / "checkpoints" / f"step-{step}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{step}" / "meta.json").write_text("{}")
    _prune(tmp_path / "checkpoints", keep_last=2, keep_every=6, saved_step=15)  # the newest two, the multiples of 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-12", "step-15", "step-6"]
    cfg = _compose("stage=mini_test", "stage.data.shards=x.tar", f"run.dir={tmp_path}", "checkpoint.export=9")
    with pytest.raises(ConfigError, match=r"checkpoint.export=9: no such checkpoint in .* \(steps there: 6, 12, 15\)"):
        export_checkpoint(cfg, None, {})


@pytest.mark.parametrize("override, message", [
    ("checkpoint.export=last", "give latest, or the step of a checkpoint the run kept"),
    ("checkpoint.keep_every=1000", "keep_every=1000 is not a multiple of checkpoint.every_steps=3"),
    ("checkpoint.keep_every=-3", "checkpoint.keep_every=-3 must be >= 0"),
])
def test_export_and_milestone_settings_are_checked(override, message):
    cfg = _compose("stage=mini_test", "stage.data.shards=x.tar", override)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)


def test_a_stage_from_scratch_must_name_its_pretrained_frozen_parts(tmp_path):
    """v1-1 at 256 px starts from scratch, so its VAE and CLIP must come from somewhere: one SD checkpoint, or
    each where SD v1 took it; the later stages take them from stage.init.from_checkpoint."""
    with pytest.raises(ConfigError, match=r"model.pretrained_vae and model.pretrained_text_encoder not set: give "
                                          r"model.pretrained_first_stage=PATH"):
        check_frozen_sources(_compose("stage=v1-1_256"), on_disk=False)
    with pytest.raises(ConfigError, match=r"model.pretrained_text_encoder not set"):
        check_frozen_sources(_compose("stage=v1-1_256", "model.pretrained_vae=/kl-f8/model.ckpt"), on_disk=False)
    with pytest.raises(ConfigError, match="both name a source of the frozen parts"):
        check_frozen_sources(_compose("stage=v1-1_256", "model.pretrained_first_stage=/sd-v1-1.ckpt",
                                      "model.pretrained_vae=/kl-f8/model.ckpt"), on_disk=False)
    parts = _compose("stage=v1-1_256", f"model.pretrained_vae={tmp_path}/model.ckpt",
                     f"model.pretrained_text_encoder={tmp_path}/clip")
    check_frozen_sources(parts, on_disk=False)
    with pytest.raises(ConfigError, match=rf"model.pretrained_vae={tmp_path}/model.ckpt: nothing is there"):
        check_frozen_sources(parts)
    check_frozen_sources(_compose("stage=v1-2"), on_disk=False)
    check_frozen_sources(_compose("stage=mini_test"))  # toy models train on random frozen parts


def test_a_stage_over_an_earlier_stages_shards_draws_its_own_order(tmp_path):
    """sd-v1-3 reads the shards sd-v1-2 read, with the same run.seed: it must not replay v1-2's sample order
    (nor its noise, seeded from the same stage seed); the same stage again must give the same order."""
    from data.loader import ShardLoader
    from data.synth import write_synthetic_shards

    write_synthetic_shards(tmp_path, num_shards=4, samples_per_shard=8, image_size=32)
    shards = f"{tmp_path}/{{00000..00003}}.tar"

    def first_keys(stage_name):
        cfg = _compose("stage=mini_test", f"stage.name={stage_name}", f"stage.data.shards='{shards}'",
                       "stage.data.resolution=32", "stage.data.num_workers=0")
        it = iter(ShardLoader(loader_config(cfg)))
        keys = [k for _ in range(4) for k in next(it)["keys"]]
        it.close()
        return keys, stage_seed(cfg)

    v12, v12_again, v13 = first_keys("v1-2"), first_keys("v1-2"), first_keys("v1-3")
    assert v12 == v12_again
    assert v12[1] != v13[1] and v12[0] != v13[0]
    assert stage_seed(_compose("stage=v1-2")) != stage_seed(_compose("stage=v1-3"))


def test_continuing_the_warmup_needs_the_carried_step():
    """restart_warmup=false continues the schedule from the step the stage carries; with init.step=false
    there is none, and the warmup restarted from zero while the config said it would not."""
    cfg = _compose("stage=v1-1_512", "cluster=reference_32x8", "stage.init.step=false",
                   "stage.init.restart_warmup=false")
    with pytest.raises(ConfigError, match="stage.init.restart_warmup=false .* set stage.init.step=true"):
        validate(cfg, 256)
    validate(_compose("stage=v1-1_512", "cluster=reference_32x8", "stage.init.restart_warmup=false"), 256)


def test_stages_after_the_first_warm_their_fresh_optimiser_up_again():
    """An export carries weights, EMA and the step, not AdamW's moments: the later stages' fresh optimiser
    warms up over 10k steps again (CompVis' init-from-checkpoint runs did), not at the full rate at once."""
    for stage in ("v1-1_512", "v1-2", "v1-3"):
        init = _compose(f"stage={stage}", "cluster=reference_32x8").stage.init
        assert (init.optimizer, init.step, init.restart_warmup) == (False, True, True), stage


def test_a_carried_ema_keeps_its_update_count_without_the_step(tmp_path):
    """stage.init.ema=true, init.step=false (the default): LitEma's num_updates travels with the average
    (model_ema.num_updates), so the carried EMA decays as the previous stage's did; restarted at 0 it would
    weigh the new weights by 1 - 2/11 at the first update and be gone within ten."""
    from models import configs
    from models.adapters import ldm_checkpoint as ldm
    from models.stable_diffusion import build_models, ldm_state_dict
    from train.export import load_stage_init

    sd = configs.tiny()
    m = build_models(sd)
    m.global_step = 60_000
    m.unet_ema = {k: v + 0.1 for k, v in m.unet.state_dict().items()}
    (tmp_path / "export").mkdir()
    # 120k updates in 60k steps: a stage run with ema.update_every=micro_batch and accumulation 2.
    ldm.write_checkpoint(tmp_path / "export" / "model.ckpt", ldm_state_dict(m, ema_num_updates=120_000), 60_000)
    cfg = TrainConfig()
    cfg.model.arch = "tiny"
    cfg.stage.init.from_checkpoint = str(tmp_path / "export")
    assert cfg.stage.init.ema and not cfg.stage.init.step
    init = load_stage_init(cfg, sd, build_models(sd))
    assert (init.step, init.ema_num_updates) == (0, 120_000)
    assert all(torch.equal(init.ema[k], m.unet_ema[k]) for k in m.unet_ema)
