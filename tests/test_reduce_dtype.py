"""parallel.reduce_dtype: the gradients cross the network in fp32 (default) or bf16. On one rank the
collective is trivial but the cast is not: after a bf16 reduction every gradient is a bf16 number."""
from __future__ import annotations

import contextlib

import pytest
import torch

from data.synth import write_synthetic_shards
from train.config import ConfigError, validate
from train.parallel.base import DTYPES
from train.parallel.deepspeed_engine import deepspeed_config
from train_helpers import compose_train_config, in_fresh_process, in_process_trainer, one_rank_group


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



def _deepspeed_bf16_accumulation_error(shards: str, zero_stage: int, steps: int) -> float:
    """The largest relative error, over the UNet's tensors, of DeepSpeed's gradient accumulated over `steps`
    bf16 micro-batches against the fp32 sum of the same micro-batch gradients (one rank: the reduction adds
    nothing). Runs in a process of its own (see in_fresh_process)."""
    import copy
    import os

    from deepspeed.utils import safe_get_full_grad

    from conftest import reinit_zeroed_, rel_err
    from models import configs
    from models.stable_diffusion import build_models
    from train.distributed import DistEnv
    from train.parallel import build_engine

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")  # what torchrun sets and DeepSpeed reads
    cfg = compose_train_config(f"stage.data.shards='{shards}'", "backend=deepspeed", "parallel.precision=bf16",
                               "parallel.channels_last=false", f"parallel.zero_stage={zero_stage}",
                               "stage.micro_batch=1", f"stage.global_batch={steps}")
    assert validate(cfg, 1) == steps
    torch.manual_seed(0)
    unet = reinit_zeroed_(build_models(configs.tiny()).unet)
    reference = copy.deepcopy(unet).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                torch.randn(1, 77, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)) for _ in range(steps)]
    with one_rank_group("deepspeed", always=True):
        engine = build_engine(cfg, unet, DistEnv(0, 1, 0, torch.device("cpu")), steps)
        for i, (x, t, c, target) in enumerate(batches):
            loss = torch.nn.functional.mse_loss(engine.module(x, t, c).float(), target)
            engine.backward(loss, last_micro_batch=i == steps - 1)
        accumulated = {n: safe_get_full_grad(p).float() for n, p in unet.named_parameters()}
    fp32_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in reference.named_parameters()}
    for x, t, c, target in batches:
        reference.zero_grad()
        (torch.nn.functional.mse_loss(reference(x.bfloat16(), t, c.bfloat16()).float(), target) / steps).backward()
        for n, p in reference.named_parameters():
            fp32_sum[n] += p.grad.float()
    return max(rel_err(accumulated[n], fp32_sum[n]) for n in fp32_sum)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_sums_bf16_micro_batches_in_fp32(shards, zero_stage):
    """Under bf16 DeepSpeed would sum the micro-batches' gradients in bf16 (its default accumulation dtype
    is the parameters'), where DDP and FSDP2 sum in fp32. ZeRO-1 and 2 sum them in fp32 through different
    code (BF16_Optimizer, an fp32 accumulator): both must give the fp32 sum."""
    error = in_fresh_process(_deepspeed_bf16_accumulation_error, shards, zero_stage, 2)
    assert error < 1e-6  # summed in bf16 instead: ~3e-3 (8 bits of mantissa)


def _deepspeed_repeated_micro_batch_sum_is_exact(shards: str, zero_stage: int, precision: str, repeats: int) -> float:
    """The fraction of DeepSpeed's accumulated gradient entries that are exactly `repeats` times a number of
    the precision, after `repeats` identical micro-batches. ZeRO-3's hooks add autograd nodes, so its bf16
    backward sums the UNet's skip-connection gradients in another order than a plain module (each tensor
    within bf16 rounding of the reference's, as far from the fp32 model's as the reference is), which rules
    out the comparison the ZeRO-1/2 test makes; fp16's loss scale rules it out too. Identical micro-batches
    give the same low-precision gradient g each time; summed in fp32, 3g is exact and divides back to g;
    summed in bf16 or fp16, 2g + g rounds to the format's mantissa."""
    import os

    from deepspeed.utils import safe_get_full_grad

    from conftest import reinit_zeroed_
    from models import configs
    from models.stable_diffusion import build_models
    from train.distributed import DistEnv
    from train.parallel import build_engine

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    cfg = compose_train_config(f"stage.data.shards='{shards}'", "backend=deepspeed", f"parallel.precision={precision}",
                               "parallel.channels_last=false", f"parallel.zero_stage={zero_stage}",
                               "stage.micro_batch=1", f"stage.global_batch={repeats}")
    assert validate(cfg, 1) == repeats
    torch.manual_seed(0)
    unet = reinit_zeroed_(build_models(configs.tiny()).unet)
    g = torch.Generator().manual_seed(1)
    x, t, c, target = (torch.randn(1, 4, 8, 8, generator=g), torch.randint(0, 1000, (1,), generator=g),
                       torch.randn(1, 77, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g))
    with one_rank_group("deepspeed", always=True):
        engine = build_engine(cfg, unet, DistEnv(0, 1, 0, torch.device("cpu")), repeats)
        for i in range(repeats):
            loss = torch.nn.functional.mse_loss(engine.module(x, t, c).float(), target)
            engine.backward(loss, last_micro_batch=i == repeats - 1)
        per_micro_batch = torch.cat([(safe_get_full_grad(p).float() / repeats).flatten() for p in unet.parameters()])
    dtype = DTYPES[precision]
    return torch.eq(per_micro_batch, per_micro_batch.to(dtype).float()).double().mean().item()


@pytest.mark.parametrize("zero_stage,precision", [(3, "bf16"), (1, "fp16"), (2, "fp16"), (3, "fp16")])
def test_deepspeed_sums_low_precision_micro_batches_in_fp32(shards, zero_stage, precision):
    exact = in_fresh_process(_deepspeed_repeated_micro_batch_sum_is_exact, shards, zero_stage, precision, 3)
    assert exact == 1.0  # summed in bf16/fp16 (grad_accum_dtype unset, DeepSpeed's default): 0.53 of the entries
