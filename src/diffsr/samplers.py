"""Samplers shared by the multi-step methods: short plain functions in the k-diffusion style.

`model(x, t) -> eps` is the network (guidance already applied) at ORIGINAL timesteps t in [0, 1000).
Noise levels are given as alpha_bar values, so one DDPM step serves both the diffusers schedule
(CCSR v2) and the LDM re-spaced one (CCSR v1): re-spaced betas beta_i = 1 - abar_i / abar_prev give
exactly the DDPM posterior between the two visited timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Model = Callable[[torch.Tensor, int], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor], torch.Tensor]


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spread over [0, num_timesteps - 1], both ends included (rounded), as
    guided-diffusion's space_timesteps with one section. The position is accumulated stride by stride as
    there: the float sum decides the rounding at exact halves (45 steps: 499, where 22 * stride gives 500)."""
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    return (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Noise a clean latent to the level alpha_bar."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step from level alpha_bar to alpha_bar_prev with the fixed-small (posterior)
    variance. Returns (x_prev, x0 estimate). No noise is added when alpha_bar_prev is 1 (the last step)."""
    beta = 1 - alpha_bar / alpha_bar_prev
    x0 = x0_from_eps(x, eps, alpha_bar)
    mean = (alpha_bar_prev**0.5 * beta / (1 - alpha_bar)) * x0 + ((1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)) * x
    if alpha_bar_prev >= 1:
        return mean, x0
    variance = max(beta * (1 - alpha_bar_prev) / (1 - alpha_bar), 1e-20)
    return mean + variance**0.5 * noise, x0


@dataclass
class TruncatedSchedule:
    """CCSR's truncated chain: one x0 estimate at `start_t`, re-noising to `renoise_alpha_bar`, then
    DDPM steps (t, alpha_bar_t, alpha_bar_prev) down to t_min. No steps: the x0 estimate is the result.
    `start_t` None: no first estimate, the steps start from the given latent (t_max = 1)."""

    start_t: int | None
    start_alpha_bar: float
    renoise_alpha_bar: float | None
    steps: list[tuple[int, float, float]]

    @property
    def evaluations(self) -> int:
        """How many network evaluations (UNet + ControlNet; a CFG pair counts once) the chain costs: the
        paper's number of diffusion steps, 1 + round(T*t_max) - round(T*t_min)."""
        return (self.start_t is not None) + len(self.steps)


@torch.no_grad()
def truncated_sample(model: Callable[[torch.Tensor, int, bool], torch.Tensor], x: torch.Tensor,
                     schedule: TruncatedSchedule, renoise: NoiseSampler, step_noise: NoiseSampler,
                     callback=None) -> torch.Tensor:
    """CCSR's non-uniform timestep sampling (paper Sec. III-B): x0 from the start latent at t=start_t, re-noise it to
    t_max, run DDPM steps down to t_min and return the last x0 estimate.

    `model(x, t, guided)`: eps; `guided` is False for the first estimate (the release applies no CFG there).
    `renoise(x)` / `step_noise(x)` draw the Gaussian noise like x (methods decide which generator).
    """
    x = x.float()
    if schedule.start_t is not None:
        x0 = x0_from_eps(x, model(x, schedule.start_t, False).float(), schedule.start_alpha_bar)
        if not schedule.steps:
            return x0
        x = q_sample(x0, renoise(x0), schedule.renoise_alpha_bar)
    for i, (t, alpha_bar, alpha_bar_prev) in enumerate(schedule.steps):
        eps = model(x, t, True).float()
        x, x0 = ddpm_step(x, eps, alpha_bar, alpha_bar_prev, step_noise(x))
        if callback is not None:
            callback(i + 1)
    return x0
