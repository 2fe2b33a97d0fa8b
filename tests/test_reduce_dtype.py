"""parallel.reduce_dtype: the gradients cross the network in fp32 (default) or bf16. On one rank the
collective is trivial but the cast is not: after a bf16 reduction every gradient is a bf16 number."""
from __future__ import annotations

import contextlib

import pytest
import torch

from data.synth import write_synthetic_shards
from train.config import ConfigError, validate
from train.parallel.deepspeed_engine import deepspeed_config
from train_helpers import compose_train_config, in_process_trainer, one_rank_group


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_shards=1, samples_per_shard=8, image_size=64, seed=0)
    return f"{out}/00000.tar"


def _gradients_after_one_backward(tmp_path, shards, backend, reduce_dtype):
    trainer = in_process_trainer(tmp_path, shards, f"backend={backend}", "parallel.precision=fp32",
                                 f"parallel.reduce_dtype={reduce_dtype}", "stage.micro_batch=4")
    from train.step import training_loss

    batch = next(iter(trainer.loader))
    loss = training_loss(batch, trainer.engine.module, trainer.frozen, trainer.schedule, trainer.env.device,
                         trainer.generator, contextlib.nullcontext(), trainer.engine.autocast())
    trainer.engine.backward(loss, last_micro_batch=True)
    grads = [p.grad for p in trainer.engine.unet.parameters() if p.grad is not None]
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def _all_bf16_numbers(grads) -> bool:
    return all(torch.equal(g, g.bfloat16().float()) for g in grads)


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_bf16_reduction_rounds_the_gradients_and_fp32_does_not(tmp_path, shards, backend):
    with one_rank_group(backend, always=True):
        fp32 = _gradients_after_one_backward(tmp_path / "fp32", shards, backend, "fp32")
    with one_rank_group(backend, always=True):
        bf16 = _gradients_after_one_backward(tmp_path / "bf16", shards, backend, "bf16")
    assert len(fp32) == len(bf16) > 100
    assert not _all_bf16_numbers(fp32) and _all_bf16_numbers(bf16)
    # The same gradients otherwise: bf16 keeps 8 bits of mantissa.
    for a, b in zip(fp32, bf16):
        assert torch.allclose(a, b, rtol=2**-7, atol=1e-30)


def test_deepspeed_reduces_in_the_configured_dtype_not_its_default(tmp_path, shards):
    cfg = compose_train_config(f"stage.data.shards='{shards}'", "backend=deepspeed", "parallel.precision=bf16")
    assert deepspeed_config(cfg, 1, 1)["communication_data_type"] == "fp32"  # DeepSpeed alone would use bf16
    cfg.parallel.reduce_dtype = "bf16"
    assert deepspeed_config(cfg, 1, 1)["communication_data_type"] == "bf16"
    cfg.parallel.reduce_dtype = "fp16"
    with pytest.raises(ConfigError, match="parallel.reduce_dtype='fp16': choose fp32 or bf16"):
        validate(cfg, 1)
