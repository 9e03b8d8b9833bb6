"""Samplers shared by the multi-step methods (StableSR, CCSR): short plain functions.

`model(x, t) -> output` is the network (with any guidance already applied) at ORIGINAL timesteps
t in [0, 1000); `prediction` says what it predicts ("epsilon" or "v_prediction"). Schedules are the
released LDM ones: the training betas re-spaced onto a subset of timesteps (guided-diffusion's
`space_timesteps`), and posterior variance "fixed small". Noise levels are alpha_bar values, so one DDPM
step (`ddpm_step`) serves the LDM re-spaced schedules (StableSR, CCSR v1) and the diffusers one (CCSR v2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from diffsr.errors import UsageError

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSampler = Callable[[torch.Tensor], torch.Tensor]
PREDICTIONS = ("epsilon", "v_prediction")
TRUNCATED_START_T = 999  # CCSR's chain starts from the LR latent (v2) or noise (v1) at t = 999


def randn(shape, generator: torch.Generator | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device and moved to `like`'s: with the CPU generator
    `upscale` makes, one seed gives the same picture on CPU and GPU."""
    where = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype or like.dtype).to(like.device)


def noise_sampler(generator: torch.Generator | None) -> NoiseSampler:
    """Standard normal noise like x (its shape, dtype and device) from `generator` (see randn)."""
    return lambda x: randn(x.shape, generator, x)


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps evenly spread over [0, num_timesteps - 1], both ends included (rounded), as
    guided-diffusion's space_timesteps with one section. The position is accumulated stride by stride as
    there: the float sum decides the rounding at exact halves (45 steps: 499, where 22 * stride gives 500)."""
    if not 1 <= count <= num_timesteps:
        raise UsageError(f"steps must be between 1 and {num_timesteps}, got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return sorted(set(steps))


@dataclass
class Schedule:
    """A re-spaced discrete schedule: the original timesteps it visits and alpha_bar at each."""

    timesteps: torch.Tensor  # (N,) ascending original timesteps
    alphas_cumprod: torch.Tensor  # (N,) float64, alpha_bar at those timesteps

    @classmethod
    def respaced(cls, alphas_cumprod: torch.Tensor, steps: int) -> "Schedule":
        timesteps = torch.tensor(space_timesteps(len(alphas_cumprod), steps))
        return cls(timesteps, alphas_cumprod.double()[timesteps])

    def __len__(self) -> int:
        return len(self.timesteps)


def to_eps(output: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        return alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * x
    raise UsageError(f"unknown prediction type '{prediction}' (choose {', '.join(PREDICTIONS)})")


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar at per-sample timesteps `t`, shaped (B, 1, 1, 1) on `like`'s device and dtype (training
    draws a timestep per sample; the functions below take it as their alpha_bar)."""
    return alphas_cumprod.to(like.device)[t].view(-1, 1, 1, 1).to(like.dtype)


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    return (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Noise a clean latent to the level alpha_bar."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral DDPM step from level alpha_bar to alpha_bar_prev with the fixed-small (posterior)
    variance. Returns (x_prev, x0 estimate). No noise is added when alpha_bar_prev is 1 (the last step)."""
    beta = 1 - alpha_bar / alpha_bar_prev
    x0 = x0_from_eps(x, eps, alpha_bar)
    mean = (alpha_bar_prev**0.5 * beta / (1 - alpha_bar)) * x0 + ((1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)) * x
    if alpha_bar_prev >= 1:
        return mean, x0
    variance = max(beta * (1 - alpha_bar_prev) / (1 - alpha_bar), 1e-20)
    return mean + variance**0.5 * noise, x0


def _step_timestep(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddpm(model: Model, x: torch.Tensor, schedule: Schedule, generator: torch.Generator | None = None,
                prediction: str = "epsilon") -> torch.Tensor:
    """Ancestral DDPM on the re-spaced betas with the fixed-small (posterior) variance, as the release's
    p_sample_loop with `time_replace`: the network sees original timesteps, the posterior uses the
    re-spaced betas beta_i = 1 - abar_i / abar_{i-1}."""
    abar = schedule.alphas_cumprod.tolist()
    for i in reversed(range(len(schedule))):
        a, a_prev = abar[i], (abar[i - 1] if i > 0 else 1.0)
        output = model(x, _step_timestep(int(schedule.timesteps[i]), x)).float()
        noise = randn(x.shape, generator, x) if i > 0 else None
        x, _ = ddpm_step(x, to_eps(output, x, a, prediction), a, a_prev, noise)
    return x


def release_ddim_alphas(alphas_cumprod: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The alpha_bar pairs StableSR's DDIM script uses: its network timesteps come from
    space_timesteps (ending at 999) but its alphas from LDM's uniform grid range(0, 1000, 1000 // steps),
    and alpha_prev of the last step is alpha_bar[0], not 1. Kept as released (`release_alphas=True`)."""
    grid = torch.arange(0, len(alphas_cumprod), len(alphas_cumprod) // steps)
    a = alphas_cumprod.double()[grid]
    a_prev = torch.cat([alphas_cumprod.double()[:1], a[:-1]])
    return a, a_prev


@torch.no_grad()
def sample_ddim(model: Model, x: torch.Tensor, schedule: Schedule, eta: float = 0.0,
                generator: torch.Generator | None = None, prediction: str = "epsilon",
                alphas: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM (eta = 0: deterministic). `alphas` overrides the (alpha_bar_t, alpha_bar_prev) pairs per step,
    ascending like the schedule (see release_ddim_alphas); by default they are the schedule's own."""
    if alphas is None:
        a_all = schedule.alphas_cumprod
        alphas = a_all, torch.cat([a_all.new_ones(1), a_all[:-1]])
    a_list, a_prev_list = alphas[0].tolist(), alphas[1].tolist()
    for i in reversed(range(len(schedule))):
        a, a_prev = a_list[i], a_prev_list[i]
        output = model(x, _step_timestep(int(schedule.timesteps[i]), x)).float()
        eps = to_eps(output, x, a, prediction)
        x0 = x0_from_eps(x, eps, a)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x)
    return x


def guide(call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, text: torch.Tensor,
          negative: torch.Tensor | None, scale: float, batched: bool = True, negative_first: bool = True,
          off: Callable[[float], bool] = lambda scale: scale == 1) -> torch.Tensor:
    """Classifier-free guidance, the one form every method and trainer uses: neg + scale * (pos - neg).

    `call(x, texts)` is the network on a batch with per-row text embeddings; `text` / `negative` are (1 or B,
    L, D). `batched`: both branches in one call on [x; x] (rows in the order `negative_first` says, as each
    release stacks them); else two calls. Guidance is skipped (one plain call) when there is no negative
    prompt or `off(scale)` holds: the releases differ on that rule (scale == 1, or scale <= 1)."""
    batch = x.shape[0]
    text = text.expand(batch, -1, -1)
    if negative is None or off(scale):
        return call(x, text)
    negative = negative.expand(batch, -1, -1)
    if batched:
        pair = (negative, text) if negative_first else (text, negative)
        first, second = call(torch.cat([x, x]), torch.cat(pair)).chunk(2)
        uncond, cond = (first, second) if negative_first else (second, first)
    else:
        cond, uncond = call(x, text), call(x, negative)
    return uncond + scale * (cond - uncond)


def one_step(image: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
             eps_at: Callable[[torch.Tensor], torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
             alpha_bar: float | torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step restoration every one-step method (and its trainer) runs: image -> latent (`encode`, a
    posterior draw or mode, unscaled) -> eps at the start timestep -> x0 -> decoded image in [-1, 1].
    Returns (x0 latent, scaled; decoded image). Differentiable: training backpropagates through it."""
    latent = encode(image) * scaling
    x0 = x0_from_eps(latent.float(), eps_at(latent).float(), alpha_bar)
    return x0, decode(x0 / scaling).clamp(-1, 1)


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
                     schedule: TruncatedSchedule, renoise: NoiseSampler, step_noise: NoiseSampler) -> torch.Tensor:
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
    for t, alpha_bar, alpha_bar_prev in schedule.steps:
        eps = model(x, t, True).float()
        x, x0 = ddpm_step(x, eps, alpha_bar, alpha_bar_prev, step_noise(x))
    return x0


def diffusers_truncated_schedule(scheduler_config: dict, steps: int, t_max: float, t_min: float) -> TruncatedSchedule:
    """CCSR v2's chain (its diffusers pipeline) on diffusers' DDPM timesteps ('leading' spacing of the base's config).

    steps == 1 is the one-step mode (x0 at t = 999). Otherwise the last round(steps*t_max) timesteps
    are kept, the first of them is the re-noising level, and the last round(steps*t_min) are dropped;
    t_max == 1 skips the first x0 estimate (the chain starts from the noised LR latent)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    alpha_bar = scheduler.alphas_cumprod
    if steps == 1:
        return TruncatedSchedule(TRUNCATED_START_T, alpha_bar[TRUNCATED_START_T].item(), None, [])
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    kept = timesteps[-round(len(timesteps) * t_max):]
    dropped = round(len(timesteps) * t_min) if t_min > 0 else 0
    chain = kept[:len(kept) - dropped]
    steps_list = []
    for t in chain:
        prev = int(scheduler.previous_timestep(t))
        steps_list.append((t, alpha_bar[t].item(), alpha_bar[prev].item() if prev >= 0 else 1.0))
    start = None if t_max == 1 else TRUNCATED_START_T
    return TruncatedSchedule(start, alpha_bar[TRUNCATED_START_T].item(), alpha_bar[kept[0]].item(), steps_list)


def ldm_alphas_cumprod(scheduler_config: dict) -> torch.Tensor:
    """LDM's float64 'linear' schedule (sqrt-linear betas), as the v1 sampler computes it."""
    betas = torch.linspace(scheduler_config["beta_start"] ** 0.5, scheduler_config["beta_end"] ** 0.5,
                           scheduler_config["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def ldm_truncated_schedule(scheduler_config: dict, steps: int, t_max: float, t_min: float) -> TruncatedSchedule:
    """CCSR v1's chain (its LDM sampler, model/q_sampler.py sample_ccsr) on `steps` re-spaced timesteps.

    The x0 estimate at index N-1 (t = 999) is re-noised to index round((N-1)*t_max) (float32 product,
    as the release computes it); DDPM steps then run from index round(N*t_max)-1 down to round(N*t_min).
    With t_min = 0 the release's slice is empty and it fails; here the steps go down to index 0.
    steps == 1 is the one-step mode (x0 at t = 999), which the v1 release does not offer."""
    alpha_bar = ldm_alphas_cumprod(scheduler_config)
    if steps == 1:
        return TruncatedSchedule(TRUNCATED_START_T, alpha_bar[TRUNCATED_START_T].item(), None, [])
    timesteps = space_timesteps(len(alpha_bar), steps)
    spaced = alpha_bar[timesteps].tolist()
    renoise_index = int(torch.round(torch.tensor(float(steps - 1)) * t_max))
    first, last = round(steps * t_max), round(steps * t_min)
    chain = [(timesteps[i], spaced[i], spaced[i - 1] if i > 0 else 1.0) for i in range(first - 1, last - 1, -1)]
    return TruncatedSchedule(timesteps[-1], spaced[-1], spaced[renoise_index], chain)
