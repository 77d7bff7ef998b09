"""Beta schedules: the noise variances beta_1..beta_T of the forward process (float32, built once).

linear (Ho et al. 2020), scaled_linear (latent diffusion), squaredcos_cap_v2 (Nichol & Dhariwal 2021),
sigmoid (GeoDiff), laplace (Hang et al. 2024), explicit trained_betas, and the zero-terminal-SNR rescaling
(Lin et al. 2024), each exactly as diffusers computes it.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _cosine_alpha_bar(t: float) -> float:  # Nichol & Dhariwal 2021, eq. 17 with s = 0.008
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def _laplace_alpha_bar(t: float) -> float:
    """Hang et al. 2024: log-SNR = -0.5 sign(0.5 - t) log(1 - 2|t - 0.5|); returns sqrt(SNR / (1 + SNR))
    (a square root too many, as in diffusers, whose schedule this must reproduce)."""
    snr = math.exp(-0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6))
    return math.sqrt(snr / (1 + snr))


def _betas_from_alpha_bar(alpha_bar: Any, T: int, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (Nichol & Dhariwal 2021, sec. 3.2)."""
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alpha_bar) so that its last value is 0 and its first is kept (Lin et al. 2024, Alg. 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab ** 2
    return 1 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])


def make_betas(config: Any) -> Tensor:
    """The float32 betas beta_1..beta_T of a scheduler config (its beta_schedule, beta_start/end,
    trained_betas, num_train_timesteps and rescale_betas_zero_snr fields)."""
    T, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":  # Ho et al. 2020
        betas = torch.linspace(b0, b1, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # latent diffusion
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float32)) * (b1 - b0) + b0
    else:
        alpha_bar = _cosine_alpha_bar if config.beta_schedule == "squaredcos_cap_v2" else _laplace_alpha_bar
        betas = _betas_from_alpha_bar(alpha_bar, T)
    return rescale_zero_terminal_snr(betas) if config.rescale_betas_zero_snr else betas
