"""The validation loss (train/validation.py): held-out shards split across ranks once each, the same
draw for a sample at every pass, and a value equal to a plain single-process computation from the
exported weights (raw and EMA), on 2 ranks of FSDP2 whose held-out shares are uneven."""
from __future__ import annotations

import pytest
import torch

from data.held_out import HeldOut
from data.synth import write_synthetic_shards
from tools.sample import load_sampling_models
from train.config import ConfigError, validate
from train.validation import draw_for
from train_helpers import compose_train_config, run_train


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("held_out")
    write_synthetic_shards(out, num_shards=2, samples_per_shard=3, image_size=64, seed=7)
    return f"{out}/{{00000..00001}}.tar"


@pytest.fixture(scope="module")
def held_out_5(tmp_path_factory):
    out = tmp_path_factory.mktemp("held_out_5")
    write_synthetic_shards(out, num_shards=1, samples_per_shard=5, image_size=64, seed=8)
    return f"{out}/00000.tar"


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_held_out_sample_goes_to_one_rank(held_out, world):
    shares = [list(HeldOut(held_out, rank, world, batch_size=2, resolution=64)) for rank in range(world)]
    ids = [i for share in shares for batch in share for i in batch["ids"]]
    assert len(ids) == len(set(ids)) == 6
    counts = [sum(len(b["ids"]) for b in share) for share in shares]
    assert max(counts) - min(counts) <= 1
    assert ids[0] == "00000.tar/" + shares[0][0]["keys"][0]


def test_held_out_shards_of_the_wrong_kind_name_their_setting(held_out):
    from data.samples import WrongShardKind

    with pytest.raises(WrongShardKind, match="point stage.data.val_shards at latent shards"):
        list(HeldOut(held_out, 0, 1, batch_size=2, resolution=64, latents=True))


def test_a_sample_draws_the_same_wherever_it_is_read():
    t1, n1 = draw_for("00000.tar/000000001", (4, 8, 8), 1000)
    t2, n2 = draw_for("00000.tar/000000001", (4, 8, 8), 1000)
    t3, n3 = draw_for("00000.tar/000000002", (4, 8, 8), 1000)
    assert t1 == t2 and torch.equal(n1, n2) and 0 <= t1 < 1000
    assert not torch.equal(n1, n3)


def _plain_validation_loss(export_dir, held_out, ema: bool) -> float:
    """What the validation loss means, computed in one process from the exported checkpoint."""
    models = load_sampling_models(export_dir, ema=ema)  # the export names its arch (tiny)
    (batch,) = HeldOut(held_out, 0, 1, batch_size=100, resolution=64)
    acp = models.alphas_cumprod.double()
    errors = []
    with torch.no_grad():
        z = models.vae.encode_latents(batch["pixels"], sample=False)
        context = models.text_encoder(batch["input_ids"])
        for i, sample_id in enumerate(batch["ids"]):
            t, noise = draw_for(sample_id, tuple(z.shape[1:]), len(acp))
            x_t = (acp[t].sqrt() * z[i] + (1 - acp[t]).sqrt() * noise).float()
            prediction = models.unet(x_t[None], torch.tensor([t]), context[i:i + 1])
            errors.append(((prediction[0] - noise) ** 2).mean().item())
    return sum(errors) / len(errors)


def test_validation_loss_is_the_plain_computation_on_two_uneven_ranks(tmp_path, two_shards, held_out_5):
    from train.wandb_records import read_run

    run_dir = tmp_path / "run"
    # 5 held-out samples over 2 ranks, 2 per micro-batch: rank 0 runs 2 + 1, rank 1 runs 2 and a padding batch
    # (weight 0) so that the collective forward passes pair up: FSDP2 gathers each block's weights in every
    # forward pass when it reshards after it (without, the gathered weights stay and only the first pass is
    # collective).
    proc = run_train(tmp_path, [f"stage.data.shards='{two_shards}'", f"run.dir={run_dir}", "backend=fsdp",
                                "parallel.reshard_after_forward=true", "parallel.precision=fp32",
                                "tracking.wandb_mode=offline", "tracking.val_every=3",
                                f"stage.data.val_shards='{held_out_5}'", "ema.max_decay=0.5"])
    assert "validation: 5 held-out samples every 3 steps" in proc.stdout
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = {row["_step"]: row for row in read_run(wandb_file).history if "val/loss" in row}
    assert sorted(rows) == [3, 6]
    assert rows[3]["val/loss"] != rows[6]["val/loss"]
    assert rows[6]["val/loss"] == pytest.approx(_plain_validation_loss(run_dir / "export", held_out_5, False), rel=1e-5)
    assert rows[6]["val/loss_ema"] == pytest.approx(_plain_validation_loss(run_dir / "export", held_out_5, True),
                                                    rel=1e-5)
    assert rows[6]["val/loss_ema"] != pytest.approx(rows[6]["val/loss"], rel=1e-4)


def test_validation_settings_go_together():
    with pytest.raises(ConfigError, match="needs held-out shards"):
        validate(compose_train_config("stage.data.shards=x.tar", "tracking.val_every=10"), 1)
    with pytest.raises(ConfigError, match="is never read"):
        validate(compose_train_config("stage.data.shards=x.tar", "stage.data.val_shards=v.tar"), 1)
    validate(compose_train_config("stage.data.shards=x.tar", "stage.data.val_shards=v.tar", "tracking.val_every=10"), 1)
