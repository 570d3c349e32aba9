"""Few-step samplers with diffusers' schedule semantics: DPM-Solver++ and diffusers' DDIM.

Both reproduce `diffusers.DPMSolverMultistepScheduler` (algorithm_type="dpmsolver++",
solver_type="midpoint", final_sigmas_type="zero", epsilon prediction) and
`diffusers.DDIMScheduler` (eta, set_alpha_to_one, steps_offset), step for step. The
schedule (timesteps, sigmas, the order of each step and its coefficients) is computed in
numpy once; sampling is one compiled `lax.scan` loop, so call the loops inside `jax.jit`.

A model function is the one `diffusion.py`'s loops take: `model_fn(x [N,H,W,C], t [N] int32)
-> [N,H,W,C_out]` with t on the 1000-step training scale; only the first C output channels
(the epsilon prediction) are used, so learned-sigma models work as they are. Classifier-free
guidance is `diffusion.cfg_model_fn`. The noise schedule is a `GaussianDiffusion` without
respacing (`diffusion.create_diffusion("")`, the default) or its `alphas_cumprod` array.

Timestep spacings (`spacing`), as diffusers names them, for N steps of a T-step process:
  linspace:  DPM: linspace(0, T-1, N+1) rounded, reversed, the last (0) dropped: 999 ... 125
             for N = 8 (t = 0 is never evaluated; the last step jumps to sigma = 0, which
             returns the data prediction). DDIM: linspace(0, T-1, N) rounded, reversed.
  leading:   DPM: arange(N+1) * (T // (N+1)), reversed, the last dropped. DDIM (diffusers'
             default): arange(N) * (T // N), reversed: 875 ... 0 for N = 8.
  trailing:  round(arange(T, 0, -T/N)) - 1: 999, 874, ... for N = 8.
`steps_offset` is added to leading timesteps (as diffusers does).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion import GaussianDiffusion, create_diffusion

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
Schedule = Union[GaussianDiffusion, np.ndarray, None]

SPACINGS = ("linspace", "leading", "trailing")


def alphas_cumprod_of(schedule: Schedule) -> np.ndarray:
    """The training process's cumulative alphas, float64: from a GaussianDiffusion (not
    respaced), an array, or None for DiT's linear 1000-step schedule."""
    if schedule is None:
        schedule = create_diffusion("")
    if isinstance(schedule, GaussianDiffusion):
        if not np.array_equal(schedule.timestep_map, np.arange(schedule.num_timesteps)):
            raise ValueError(
                "the solvers space timesteps themselves; pass the diffusion without "
                "respacing (create_diffusion('')) or its alphas_cumprod."
            )
        return np.asarray(schedule.consts["alphas_cumprod"], np.float64)
    ac = np.asarray(schedule, np.float64)
    if ac.ndim != 1 or not ((ac > 0) & (ac <= 1)).all():
        raise ValueError("alphas_cumprod must be a 1-D array in (0, 1].")
    return ac


def _check(num_steps: int, spacing: str, num_train: int):
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
    if not 0 < num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}.")


def dpm_timesteps(
    num_steps: int,
    spacing: str = "linspace",
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
) -> np.ndarray:
    """DPMSolverMultistepScheduler.set_timesteps: the N model timesteps, descending."""
    _check(num_steps, spacing, num_train_timesteps)
    t_max = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, t_max - 1, num_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = t_max // (num_steps + 1)
        ts = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    else:
        ts = np.arange(t_max, 0, -t_max / num_steps).round() - 1
    return ts.astype(np.int64)


def ddim_timesteps(
    num_steps: int, spacing: str = "leading", num_train_timesteps: int = 1000, steps_offset: int = 0
) -> np.ndarray:
    """DDIMScheduler.set_timesteps: the N model timesteps, descending."""
    _check(num_steps, spacing, num_train_timesteps)
    t_max = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, t_max - 1, num_steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(num_steps) * (t_max // num_steps)).round()[::-1] + steps_offset
    else:
        ts = np.arange(t_max, 0, -t_max / num_steps).round() - 1
    return ts.astype(np.int64)


# ----------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, data prediction)
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DPMSolverSchedule:
    """Everything a DPM-Solver++ run needs, per step i (N steps):
    timesteps [N] (the model's t), sigmas [N+1] (VE sigma = sqrt((1-abar)/abar), last 0),
    orders [N], and the update x_{i+1} = c_x x_i + c_0 D_i + c_1 D_{i-1} + c_2 D_{i-2}, where
    D_j = (x_j - s_j eps_j) / a_j is the data prediction at step j (a = 1/sqrt(1+sigma^2),
    s = sigma a): coeffs [N, 4] = (c_x, c_0, c_1, c_2), alpha/sigma_t [N] = (a_i, s_i)."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    orders: np.ndarray
    coeffs: np.ndarray
    alpha_t: np.ndarray
    sigma_t: np.ndarray


def _dpm_coefficients(sig: np.ndarray, i: int, order: int) -> np.ndarray:
    """(c_x, c_0, c_1, c_2) of diffusers' dpmsolver++ midpoint update of the given order."""
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    s = sig * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)  # +inf where sigma = 0
    a_t, s_t = alpha[i + 1], s[i + 1]
    h = lam[i + 1] - lam[i]
    em1 = np.expm1(-h) if np.isfinite(h) else -1.0  # exp(-h) - 1
    c_x = s_t / s[i]
    big_a = a_t * em1
    if order == 1:
        return np.array([c_x, -big_a, 0.0, 0.0])
    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:  # D1 = (m0 - m1) / r0; x = c_x x - A D0 - A D1 / 2
        return np.array([c_x, -big_a - 0.5 * big_a / r0, 0.5 * big_a / r0, 0.0])
    r1 = (lam[i - 1] - lam[i - 2]) / h
    big_b = a_t * (em1 / h + 1.0)
    big_c = a_t * ((em1 + h) / h**2 - 0.5)
    q = r0 / (r0 + r1)
    u = big_b * (1 + q) - big_c / (r0 + r1)  # weight of D1_0 = (m0 - m1) / r0
    v = -big_b * q + big_c / (r0 + r1)  # weight of D1_1 = (m1 - m2) / r1
    return np.array([c_x, -big_a + u / r0, -u / r0 + v / r1, -v / r1])


def dpm_solver_schedule(
    num_steps: int,
    *,
    order: int = 2,
    spacing: str = "linspace",
    schedule: Schedule = None,
    lower_order_final: bool = True,
    steps_offset: int = 0,
) -> DPMSolverSchedule:
    """diffusers' DPMSolverMultistepScheduler(solver_order=order, timestep_spacing=spacing,
    lower_order_final=..., final_sigmas_type="zero") after set_timesteps(num_steps).

    Orders ramp up 1, 2, ... to `order`; the last step is first order (sigma goes to 0); with
    lower_order_final and fewer than 15 steps, the second-to-last is at most second order."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3, got {order}.")
    ac = alphas_cumprod_of(schedule)
    ts = dpm_timesteps(num_steps, spacing, len(ac), steps_offset)
    if ts.min() < 0 or ts.max() >= len(ac):
        raise ValueError(
            f"timesteps {ts.tolist()} fall outside [0, {len(ac) - 1}]; lower steps_offset."
        )
    # diffusers keeps alphas_cumprod and sigmas in float32
    sig_train = np.sqrt((1 - ac.astype(np.float32)) / ac.astype(np.float32))
    sig = np.append(sig_train[ts], 0.0).astype(np.float32).astype(np.float64)
    n = len(ts)
    orders, coeffs = [], []
    for i in range(n):
        last = i == n - 1  # final_sigmas_type="zero" always makes the last step first order
        second_last = i == n - 2 and lower_order_final and n < 15
        k = 1 if last else min(order, i + 1, 2 if second_last else 3)
        orders.append(k)
        coeffs.append(_dpm_coefficients(sig, i, k))
    alpha = 1.0 / np.sqrt(sig[:-1] ** 2 + 1.0)
    return DPMSolverSchedule(
        timesteps=ts,
        sigmas=sig,
        orders=np.array(orders),
        coeffs=np.stack(coeffs),
        alpha_t=alpha,
        sigma_t=sig[:-1] * alpha,
    )


def dpm_solver_sample_loop(
    model_fn: ModelFn,
    noise: Array,
    num_steps: int = 20,
    *,
    order: int = 2,
    spacing: str = "linspace",
    schedule: Schedule = None,
    lower_order_final: bool = True,
    steps_offset: int = 0,
    clip_denoised: bool = False,
    return_trajectory: bool = False,
):
    """DPM-Solver++ from x_T = `noise` (init sigma 1, as diffusers) in `num_steps` model calls.
    clip_denoised clips each data prediction to [-1, 1] (static thresholding; for pixel space,
    as the DDPM/DDIM loops' clip_denoised).

    Returns the final latents, or (latents, trajectory [num_steps, *noise.shape]) where
    trajectory[i] is x after step i, as diffusers' scheduler.step returns it."""
    sch = dpm_solver_schedule(
        num_steps,
        order=order,
        spacing=spacing,
        schedule=schedule,
        lower_order_final=lower_order_final,
        steps_offset=steps_offset,
    )
    n, c = noise.shape[0], noise.shape[-1]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    xs = (
        jnp.asarray(sch.timesteps, jnp.int32),
        f32(sch.alpha_t),
        f32(sch.sigma_t),
        f32(sch.coeffs),
    )

    def body(carry, inputs):
        x, d1, d2 = carry
        t, a, s, k = inputs
        eps = model_fn(x, jnp.full((n,), t, jnp.int32))[..., :c].astype(jnp.float32)
        d0 = (x - s * eps) / a
        if clip_denoised:
            d0 = jnp.clip(d0, -1.0, 1.0)
        x = k[0] * x + k[1] * d0 + k[2] * d1 + k[3] * d2
        return (x, d0, d1), x if return_trajectory else None

    x0 = noise.astype(jnp.float32)
    (x, _, _), traj = jax.lax.scan(body, (x0, jnp.zeros_like(x0), jnp.zeros_like(x0)), xs)
    return (x, traj) if return_trajectory else x


# ----------------------------------------------------------------------------------------
# diffusers' DDIM
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DDIMSchedule:
    """diffusers' DDIMScheduler after set_timesteps(N): timesteps [N], and per step the
    cumulative alphas at t and at t - T // N (the final alpha where that is below 0)."""

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray


def ddim_schedule(
    num_steps: int,
    *,
    spacing: str = "leading",
    schedule: Schedule = None,
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
) -> DDIMSchedule:
    """As diffusers: the previous timestep is always t - T // N, whatever the spacing, and
    below 0 it is 1 (set_alpha_to_one) or alphas_cumprod[0]."""
    ac = alphas_cumprod_of(schedule)
    num_train = len(ac)
    ts = ddim_timesteps(num_steps, spacing, num_train, steps_offset)
    if ts.min() < 0 or ts.max() >= num_train:
        raise ValueError(
            f"timesteps {ts.tolist()} fall outside [0, {num_train - 1}]; lower steps_offset."
        )
    ac32 = ac.astype(np.float32).astype(np.float64)
    final = 1.0 if set_alpha_to_one else ac32[0]
    prev = ts - num_train // num_steps
    ac_prev = np.where(prev >= 0, ac32[np.maximum(prev, 0)], final)
    return DDIMSchedule(timesteps=ts, alphas_cumprod=ac32[ts], alphas_cumprod_prev=ac_prev)


def ddim_sample_loop(
    model_fn: ModelFn,
    noise: Array,
    num_steps: int = 50,
    *,
    eta: float = 0.0,
    key: Optional[Array] = None,
    spacing: str = "leading",
    schedule: Schedule = None,
    set_alpha_to_one: bool = True,
    steps_offset: int = 0,
    return_trajectory: bool = False,
):
    """diffusers' DDIMScheduler loop from x = `noise` at the first timestep (e.g. 875 for 8
    leading steps: the noise is used as x_t there). eta > 0 needs a PRNG `key`; the noise of
    step i is drawn from fold_in(key, i). Returns latents, or (latents, trajectory)."""
    if eta != 0 and key is None:
        raise ValueError("DDIM with eta > 0 needs a PRNG `key`.")
    sch = ddim_schedule(
        num_steps,
        spacing=spacing,
        schedule=schedule,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=steps_offset,
    )
    ab, ab_prev = sch.alphas_cumprod, sch.alphas_cumprod_prev
    std = eta * np.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    n, c = noise.shape[0], noise.shape[-1]
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    xs = (
        jnp.arange(len(ab)),
        jnp.asarray(sch.timesteps, jnp.int32),
        f32(np.sqrt(ab)),
        f32(np.sqrt(1 - ab)),
        f32(np.sqrt(ab_prev)),
        f32(np.sqrt(1 - ab_prev - std**2)),
        f32(std),
    )

    def body(x, inputs):
        i, t, sa, s1a, sa_prev, dir_coef, sd = inputs
        eps = model_fn(x, jnp.full((n,), t, jnp.int32))[..., :c].astype(jnp.float32)
        x0 = (x - s1a * eps) / sa
        x = sa_prev * x0 + dir_coef * eps
        if eta != 0:
            x = x + sd * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        return x, x if return_trajectory else None

    x, traj = jax.lax.scan(body, noise.astype(jnp.float32), xs)
    return (x, traj) if return_trajectory else x
