"""rCM few-step sampling in rectified-flow form, as upstream's inference scripts run it.

The schedule is fixed TrigFlow angles mapped to rectified-flow time; the state is float64, the
network sees bf16 inputs and bf16-rounded timesteps. Every random draw comes from one generator in a
fixed order (initial noise, then one draw per SDE step), so a seed reproduces a video.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from turbovideo.catalog import MAX_STEPS

# Intermediate TrigFlow angles shared by every model; a run with N steps uses the first N-1.
MID_ANGLES = (1.5, 1.4, 1.0)[: MAX_STEPS - 1]

# velocity(step_index, x_bf16, timestep_bf16[B]) -> rectified-flow velocity (eps - x0), any float dtype.
VelocityFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def trigflow_angles(sigma_max: float, num_steps: int) -> torch.Tensor:
    """The N+1 TrigFlow angles [atan(sigma_max), mid..., 0] in float64."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps must be 1..{MAX_STEPS}, got {num_steps}")
    angles = [math.atan(sigma_max), *MID_ANGLES[: num_steps - 1], 0.0]
    return torch.tensor(angles, dtype=torch.float64)


def rf_times(sigma_max: float, num_steps: int) -> torch.Tensor:
    """Rectified-flow times t = sin/(cos+sin) of the angles (float64, N+1 values ending at 0)."""
    angles = trigflow_angles(sigma_max, num_steps)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def network_timestep(t: float, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
    """The timestep the network sees: bf16(1000 * float64(fp32(t))), shape [batch].

    The detour through fp32 and the bf16 rounding are part of what the checkpoints were distilled with.
    """
    value = 1000.0 * float(torch.tensor(t, dtype=torch.float32))
    return torch.full((batch,), value, dtype=torch.float64, device=device).to(torch.bfloat16)


def expert_per_step(times: torch.Tensor, boundary: float) -> list[int]:
    """Which I2V expert runs each step: 0 (high noise) until t_cur < boundary, then 1 (low noise) for good."""
    experts: list[int] = []
    switched = False
    for t_cur in times[:-1].tolist():
        switched = switched or t_cur < boundary
        experts.append(1 if switched else 0)
    return experts


def sample(
    velocity: VelocityFn,
    shape: Sequence[int],
    times: torch.Tensor,
    generator: torch.Generator,
    *,
    ode: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from pure noise to a clean latent; returns float32 of ``shape``.

    SDE (default): x <- (1 - t_next) * x0_pred + fp32(t_next) * fresh noise, one draw per step
    including the last. ODE: Euler on the velocity, no draws after the initial noise.
    ``on_step(i)`` is called after step i (0-based) finishes.
    """
    device = generator.device
    times = times.to(torch.float64)
    noise = torch.randn(tuple(shape), dtype=torch.float32, device=device, generator=generator)
    x = noise.to(torch.float64) * times[0].item()
    for i, (t_cur, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist(), strict=True)):
        timestep = network_timestep(t_cur, x.shape[0], device)
        v = velocity(i, x.to(torch.bfloat16), timestep).to(torch.float64)
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            fresh = torch.randn(x.shape, dtype=torch.float32, device=device, generator=generator)
            # The noise term is formed in fp32 (fp32 time times fp32 noise), then added in float64. A
            # Python number multiplies an fp32 tensor as an fp32 value, and unlike a tensor made from it
            # on the GPU, it does not make the host wait for the queued steps (the GPU would then idle
            # while the host queues the next one).
            x = (1.0 - t_next) * (x - t_cur * v) + (fresh * t_next).to(torch.float64)
        if on_step is not None:
            on_step(i)
    return x.to(torch.float32)
