"""The DDPM schedule against diffusers' DDPMScheduler (an independent implementation of the same
"scaled_linear" betas) and against the original's formulas for the posterior buffers."""
import numpy as np
import torch
from diffusers import DDPMScheduler

from models.schedule import BUFFER_NAMES, DDPMSchedule


def test_betas_and_alphas_cumprod_match_diffusers():
    ours = DDPMSchedule()
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers computes in float32, the original (and we) in float64 then store float32.
    assert torch.allclose(ours.betas, theirs.betas, rtol=1e-6, atol=0)
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-5, atol=0)
    assert ours.betas[0].item() == np.float32(0.00085) and ours.betas[-1].item() == np.float32(0.012)
    assert abs(ours.alphas_cumprod[-1].item() - 0.0046600) < 1e-6  # SD v1's terminal alpha-bar


def test_posterior_buffers_follow_the_original_formulas():
    s = DDPMSchedule()
    betas = (np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    expected = {
        "posterior_variance": variance,
        "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
    }
    for name, value in expected.items():
        assert torch.equal(getattr(s, name), torch.tensor(value, dtype=torch.float32)), name
    assert list(s.state_dict()) == list(BUFFER_NAMES)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in s.state_dict().values())


def test_q_sample_matches_diffusers_add_noise():
    s = DDPMSchedule()
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.allclose(s.q_sample(x0, t, noise), theirs.add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
