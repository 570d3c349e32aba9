"""SiT (Ma et al. 2024): stochastic interpolants on the DiT backbone, exact to willisma/SiT.

Time runs from noise to data: t = 0 is pure noise x0 ~ N(0, I), t = 1 is data x1, and
    x_t = alpha_t * x1 + sigma_t * x0,    u_t = d_alpha_t * x1 + d_sigma_t * x0.
Paths: Linear (alpha = t, sigma = 1 - t), GVP (sin / cos of pi t / 2) and VP (the score-SDE
VP schedule with beta in [0.1, 20], time reversed). The model predicts the velocity u_t, the
noise x0, or the score -x0 / sigma_t; it gets the continuous t in [0, 1] as its timestep
(no x1000). Arrays are NHWC. A model function is `model_fn(x [B,H,W,C], t [B] float32)`
returning [B,H,W,C], or [B,H,W,2C] for a learned-sigma DiT: the second half is dropped, as
SiT does, so it is never trained.

`Interpolant` mirrors the reference's `create_transport` (same eps defaults and time
intervals); `training_losses` mirrors `Transport.training_losses`; `sample_ode` and
`sample_sde` mirror `Sampler.sample_ode` (torchdiffeq euler/heun2 on the same fixed grid,
dopri5 through diffrax) and `Sampler.sample_sde` (Euler-Maruyama or Heun, then the last
step). Samplers are compiled loops (`lax.scan` / diffrax): call them inside `jax.jit`.
Classifier-free guidance is a model function: `diffusion.cfg_model_fn`.

Departures, each a clear ValueError where the reference would go wrong quietly: settings
whose sampler would evaluate an infinite or NaN coefficient (SBDM diffusion at t = 0 on
Linear/GVP with velocity prediction; Heun SDE without a last step, whose final stage sees
t = 1); a loss weight with velocity prediction (the reference ignores it); an explicit eps
with velocity prediction on Linear/GVP (the reference replaces it by 0). An explicit
train_eps with no sample_eps keeps sample_eps at its default (the reference sets it to None).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

PATHS = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")
ODE_METHODS = ("euler", "heun2", "dopri5")
SDE_METHODS = ("Euler", "Heun")


def mean_flat(x: Array) -> Array:
    """[B, ...] -> [B]: mean over all but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def linspace(t0: float, t1: float, num: int) -> np.ndarray:
    """[num] float32 grid computed as torch.linspace does (first half from t0, second from t1)."""
    t0, t1 = np.float32(t0), np.float32(t1)
    step = (t1 - t0) / np.float32(max(num - 1, 1))
    i = np.arange(num, dtype=np.float32)
    grid = np.where(i < num // 2, t0 + step * i, t1 - step * (np.float32(num - 1) - i))
    return grid.astype(np.float32)


def _like(t, x: Array) -> Array:
    """t ([B] or scalar) broadcastable against x [B, ...]."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t


@dataclasses.dataclass(frozen=True)
class Interpolant:
    """A path, what the model predicts, the loss weight and the t intervals.

    Defaults follow the reference's `create_transport`: train_eps/sample_eps are 1e-5/1e-3
    on VP, 1e-3/1e-3 for noise or score prediction on Linear/GVP, and 0 for velocity
    prediction on Linear/GVP (stable on all of [0, 1]).
    """

    path: str = "Linear"
    prediction: str = "velocity"
    loss_weight: Optional[str] = None
    train_eps: Optional[float] = None
    sample_eps: Optional[float] = None
    beta_min: float = 0.1  # VP only (the reference's sigma_min)
    beta_max: float = 20.0  # VP only (the reference's sigma_max)

    def __post_init__(self):
        for value, choices, what in (
            (self.path, PATHS, "path"),
            (self.prediction, PREDICTIONS, "prediction"),
            (self.loss_weight, LOSS_WEIGHTS, "loss_weight"),
        ):
            if value not in choices:
                raise ValueError(f"Unknown {what} {value!r}; choose one of {choices}.")
        if self.prediction == "velocity" and self.loss_weight is not None:
            raise ValueError(
                f"loss_weight={self.loss_weight!r} applies to noise and score "
                "prediction only (the reference ignores it for velocity)."
            )
        if self.path == "VP":
            train, sample = 1e-5, 1e-3
        elif self.prediction != "velocity":
            train, sample = 1e-3, 1e-3
        else:
            if any(e not in (None, 0) for e in (self.train_eps, self.sample_eps)):
                raise ValueError(
                    "Velocity prediction on the Linear and GVP paths uses all of "
                    "[0, 1]; the reference replaces train_eps/sample_eps by 0 there, "
                    "so leave them unset."
                )
            train, sample = 0.0, 0.0
        train = train if self.train_eps is None else self.train_eps
        sample = sample if self.sample_eps is None else self.sample_eps
        object.__setattr__(self, "train_eps", float(train))
        object.__setattr__(self, "sample_eps", float(sample))

    # -- the path --------------------------------------------------------------------------
    def _vp_log_mean(self, t):
        width = self.beta_max - self.beta_min
        return -0.25 * (1 - t) ** 2 * width - 0.5 * (1 - t) * self.beta_min

    def _vp_d_log_mean(self, t):
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t: Array) -> tuple[Array, Array]:
        """Data coefficient alpha_t and its derivative, same shape as t."""
        t = jnp.asarray(t, jnp.float32)
        if self.path == "Linear":
            return t, jnp.ones_like(t)
        if self.path == "GVP":
            return jnp.sin(t * np.pi / 2), np.pi / 2 * jnp.cos(t * np.pi / 2)
        a = jnp.exp(self._vp_log_mean(t))
        return a, a * self._vp_d_log_mean(t)

    def sigma(self, t: Array) -> tuple[Array, Array]:
        """Noise coefficient sigma_t and its derivative, same shape as t."""
        t = jnp.asarray(t, jnp.float32)
        if self.path == "Linear":
            return 1 - t, -jnp.ones_like(t)
        if self.path == "GVP":
            return jnp.cos(t * np.pi / 2), -np.pi / 2 * jnp.sin(t * np.pi / 2)
        e = jnp.exp(2 * self._vp_log_mean(t))
        s = jnp.sqrt(1 - e)
        return s, e * (2 * self._vp_d_log_mean(t)) / (-2 * s)

    def drift_coefficients(self, t: Array) -> tuple[Array, Array]:
        """(f, g): the probability-flow velocity is v = f * x + g * score. g is the SBDM
        diffusion (the reference's `compute_drift(x, t)[1]`, infinite at t = 0 on Linear/GVP);
        f = d_alpha / alpha (VP: beta_t / 2)."""
        t = jnp.asarray(t, jnp.float32)
        if self.path == "VP":
            beta = self.beta_min + (1 - t) * (self.beta_max - self.beta_min)
            return 0.5 * beta, beta / 2
        ratio = 1 / t if self.path == "Linear" else np.pi / (2 * jnp.tan(t * np.pi / 2))
        s, ds = self.sigma(t)
        return ratio, ratio * s**2 - s * ds

    def plan(self, t: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
        """t [B], noise x0 and data x1 [B,H,W,C] -> (x_t, u_t), both [B,H,W,C]."""
        a, da = self.alpha(_like(t, x1))
        s, ds = self.sigma(_like(t, x1))
        return a * x1 + s * x0, da * x1 + ds * x0

    # -- conversions -----------------------------------------------------------------------
    def score_from_velocity(self, v: Array, x: Array, t: Array) -> Array:
        """Velocity v at (x, t) -> score of p_t; [B,H,W,C] with t [B]."""
        a, da = self.alpha(_like(t, x))
        s, ds = self.sigma(_like(t, x))
        r = a / da
        return (r * v - x) / (s**2 - r * ds * s)

    def noise_from_velocity(self, v: Array, x: Array, t: Array) -> Array:
        """Velocity v at (x, t) -> the noise x0 it implies; [B,H,W,C] with t [B]."""
        a, da = self.alpha(_like(t, x))
        s, ds = self.sigma(_like(t, x))
        r = a / da
        return (r * v - x) / (r * ds - s)

    def velocity_from_score(self, score: Array, x: Array, t: Array) -> Array:
        """Score at (x, t) -> probability-flow velocity f x + g score."""
        f, g = self.drift_coefficients(_like(t, x))
        return f * x + g * score

    def score_from_noise(self, noise: Array, x: Array, t: Array) -> Array:
        """Noise prediction -> score = -noise / sigma_t."""
        return noise / -self.sigma(_like(t, x))[0]

    def noise_from_score(self, score: Array, x: Array, t: Array) -> Array:
        """Score -> noise = -sigma_t * score."""
        return -self.sigma(_like(t, x))[0] * score

    def velocity_from_output(self, out: Array, x: Array, t: Array) -> Array:
        """The model's prediction (of this interpolant's kind) -> the ODE velocity."""
        if self.prediction == "velocity":
            return out
        score = out if self.prediction == "score" else self.score_from_noise(out, x, t)
        return self.velocity_from_score(score, x, t)

    def score_from_output(self, out: Array, x: Array, t: Array) -> Array:
        """The model's prediction (of this interpolant's kind) -> the score."""
        if self.prediction == "score":
            return out
        if self.prediction == "noise":
            return self.score_from_noise(out, x, t)
        return self.score_from_velocity(out, x, t)

    def diffusion(self, t: Array, form: str = "SBDM", norm: float = 1.0) -> Array:
        """The SDE's diffusion coefficient w(t) (the noise scale is sqrt(2 w)); t's shape."""
        t = jnp.asarray(t, jnp.float32)
        if form == "inccreasing-decreasing":  # the reference's spelling
            form = "increasing-decreasing"
        if form == "constant":
            return jnp.full_like(t, norm)
        if form == "SBDM":
            return norm * self.drift_coefficients(t)[1]
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(np.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * jnp.sin(np.pi * t) ** 2
        raise ValueError(f"Unknown diffusion_form {form!r}; choose one of {DIFFUSION_FORMS}.")

    # -- training --------------------------------------------------------------------------
    def time_interval(
        self,
        *,
        sde: bool = False,
        diffusion_form: str = "SBDM",
        last_step_size: float = 0.0,
        reverse: bool = False,
        train: bool = False,
    ) -> tuple[float, float]:
        """(t0, t1) as the reference's `check_interval`: training (train=True, eps =
        train_eps) or sampling (eps = sample_eps); the SDE ends at 1 - last_step_size."""
        eps = self.train_eps if train else self.sample_eps
        t0, t1 = 0.0, 1.0
        end = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path == "VP":
            t1 = end
        elif self.prediction != "velocity" or sde:
            sbdm = diffusion_form == "SBDM" and sde
            t0 = eps if (sbdm or self.prediction != "velocity") else 0.0
            t1 = end
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    def sample_t(self, key: Array, batch: int) -> Array:
        """[batch] training times, uniform on the training interval."""
        t0, t1 = self.time_interval(train=True)
        return jax.random.uniform(key, (batch,), jnp.float32) * (t1 - t0) + t0

    def training_losses(
        self,
        model_fn: ModelFn,
        x1: Array,
        key: Optional[Array] = None,
        *,
        t: Optional[Array] = None,
        noise: Optional[Array] = None,
    ) -> dict:
        """Per-example loss of data x1 [B,H,W,C]: t [B] and noise x0 [B,H,W,C] are drawn from
        `key` unless given. Returns {'loss' [B], 'weight' [B], 't', 'noise', 'x_t', 'pred'}.

        velocity: mean((pred - u_t)^2); noise: mean(w (pred - x0)^2); score: mean(w (pred
        sigma_t + x0)^2), with w = 1, (g / sigma_t)^2 ('velocity') or g / sigma_t^2
        ('likelihood'), g the SBDM diffusion."""
        if t is None or noise is None:
            if key is None:
                raise ValueError(
                    "training_losses needs a PRNG `key` unless t and noise are both given."
                )
            key_t, key_n = jax.random.split(key)
            t = self.sample_t(key_t, x1.shape[0]) if t is None else t
            noise = jax.random.normal(key_n, x1.shape, x1.dtype) if noise is None else noise
        t = jnp.asarray(t, jnp.float32)
        x_t, u_t = self.plan(t, noise, x1)
        pred = model_fn(x_t, t)[..., : x1.shape[-1]]
        if self.prediction == "velocity":
            weight = jnp.ones_like(t)
            loss = mean_flat((pred - u_t) ** 2)
        else:
            g = self.drift_coefficients(t)[1]
            s = self.sigma(t)[0]
            weight = {None: jnp.ones_like(t), "velocity": (g / s) ** 2, "likelihood": g / s**2}[
                self.loss_weight
            ]
            s, w = _like(s, x1), _like(weight, x1)
            err = pred - noise if self.prediction == "noise" else pred * s + noise
            loss = mean_flat(w * err**2)
        return {"loss": loss, "weight": weight, "t": t, "noise": noise, "x_t": x_t, "pred": pred}

    # -- sampling --------------------------------------------------------------------------
    def velocity(self, model_fn: ModelFn, x: Array, t: Array) -> Array:
        """The probability-flow ODE's velocity at x [B,H,W,C], t [B] (one model call)."""
        return self.velocity_from_output(model_fn(x, t)[..., : x.shape[-1]], x, t)

    def _sde_drift(self, out, x, t, form, norm):
        w = _like(self.diffusion(t, form, norm), x)
        return self.velocity_from_output(out, x, t) + w * self.score_from_output(out, x, t)

    def _last_step(self, kind, out, x, t, size, form, norm):
        if kind is None:
            return x
        if kind == "Mean":
            return x + self._sde_drift(out, x, t, form, norm) * size
        if kind == "Euler":
            return x + self.velocity_from_output(out, x, t) * size
        a, s = self.alpha(_like(t, x))[0], self.sigma(_like(t, x))[0]
        return x / a + s**2 / a * self.score_from_output(out, x, t)

    def _check_finite(self, what: str, times, fn) -> None:
        """Raise if `fn(out, x, t)` (the sampler's coefficients) is not finite at a time the
        sampler calls the model."""
        with jax.ensure_compile_time_eval():
            one = jnp.ones((1, 1, 1, 1), jnp.float32)
            for tv in np.unique(np.asarray(times, np.float32)):
                value = np.asarray(fn(one, one, jnp.full((1,), tv, jnp.float32)))
                if not np.all(np.isfinite(value)):
                    raise ValueError(
                        f"{what} on the {self.path} path with {self.prediction} prediction "
                        f"evaluates a non-finite coefficient at t = {float(tv):g} (the reference "
                        "returns NaN or inf there). Move the interval off the singular end: e.g. "
                        "diffusion_form='sigma' instead of 'SBDM' at t = 0, a last step for the "
                        "Heun SDE, or a nonzero sample_eps."
                    )

    def ode_grid(self, num_steps: int, reverse: bool = False) -> np.ndarray:
        """[num_steps] float32 times of the fixed ODE grid (noise -> data, or back)."""
        return linspace(*self.time_interval(reverse=reverse), num_steps)

    def sde_grid(
        self, num_steps: int, diffusion_form: str = "SBDM", last_step_size: float = 0.04
    ) -> np.ndarray:
        """[num_steps] float32 SDE times; the last one is where the last step starts."""
        return linspace(
            *self.time_interval(
                sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size
            ),
            num_steps,
        )

    def sample_ode(
        self,
        model_fn: ModelFn,
        x: Array,
        *,
        method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        reverse: bool = False,
        return_trajectory: bool = False,
        max_steps: int = 4096,
    ) -> Array:
        """Integrate the probability-flow ODE from noise x [B,H,W,C] (t0 ~ 0) to data (t1 ~ 1),
        or from data back to noise with reverse=True.

        euler / heun2: fixed steps over linspace(t0, t1, num_steps) (num_steps - 1 steps, as
        torchdiffeq on the reference's grid). dopri5: adaptive (diffrax, rtol/atol, an RMS
        error norm); num_steps is then only the number of saved points. Returns the final
        state, or with return_trajectory the [num_steps, B, H, W, C] states on the grid."""
        if method not in ODE_METHODS:
            raise ValueError(f"Unknown ODE method {method!r}; choose one of {ODE_METHODS}.")
        if num_steps < 2:
            raise ValueError(
                f"num_steps counts grid points including both ends; need >= 2, got {num_steps}."
            )
        g = self.ode_grid(num_steps, reverse)
        self._check_finite(
            f"The {method} ODE",
            g if method != "euler" else g[:-1],
            lambda o, y, t: self.velocity_from_output(o, y, t),
        )
        n = x.shape[0]

        def drift(y, t):
            return self.velocity(model_fn, y, jnp.full((n,), t, jnp.float32))

        if method == "dopri5":
            return _dopri5(drift, x, g, atol, rtol, return_trajectory, max_steps)

        def body(y, ts):
            ta, tb = ts
            dt = tb - ta
            k1 = drift(y, ta)
            if method == "euler":
                y = y + dt * k1
            else:
                k2 = drift(y + dt * k1, tb)
                y = y + dt * (0.5 * k1 + 0.5 * k2)
            return y, (y if return_trajectory else None)

        y, ys = jax.lax.scan(body, x, (g[:-1], g[1:]))
        return jnp.concatenate([x[None], ys]) if return_trajectory else y

    def sample_sde(
        self,
        model_fn: ModelFn,
        x: Array,
        *,
        method: str = "Euler",
        diffusion_form: str = "SBDM",
        diffusion_norm: float = 1.0,
        last_step: Optional[str] = "Mean",
        last_step_size: float = 0.04,
        num_steps: int = 250,
        key: Optional[Array] = None,
        step_noise: Optional[Array] = None,
        return_trajectory: bool = False,
    ) -> Array:
        """Integrate the SDE dx = [v + w score] dt + sqrt(2 w) dW from noise x [B,H,W,C].

        num_steps grid points over [t0, 1 - last_step_size]: num_steps - 1 noisy steps
        (Euler-Maruyama, or Heun: noise first, then a Heun step of the drift), then the last
        step at t1 ('Mean': x + drift dt_last, 'Tweedie': denoise, 'Euler': x + v dt_last, None:
        none). Noise: step_noise [num_steps - 1, B, H, W, C] (step 0 first) or drawn from key
        folded with the step number. Returns the sample, or with return_trajectory the
        [num_steps, B, H, W, C] states after each step (the last is the sample)."""
        if method not in SDE_METHODS:
            raise ValueError(f"Unknown SDE method {method!r}; choose one of {SDE_METHODS}.")
        if last_step not in LAST_STEPS:
            raise ValueError(f"Unknown last_step {last_step!r}; choose one of {LAST_STEPS}.")
        if num_steps < 2:
            raise ValueError(
                f"num_steps counts grid points including both ends; need >= 2, got {num_steps}."
            )
        self.diffusion(0.5, diffusion_form)  # validates the form
        if last_step is None:
            last_step_size = 0.0
        g = self.sde_grid(num_steps, diffusion_form, last_step_size)
        dt = g[1] - g[0]
        form, norm = diffusion_form, diffusion_norm
        # Heun's second stage is at t_i + dt, which is t_{i+1} up to rounding: check both.
        times = g[:-1] if method == "Euler" else np.concatenate([g, g[:-1] + dt])
        self._check_finite(
            f"The {method} SDE",
            times,
            lambda o, y, t: (
                self._sde_drift(o, y, t, form, norm) + jnp.sqrt(2 * self.diffusion(t, form, norm))
            ),
        )
        if last_step is not None:
            self._check_finite(
                f"The SDE's {last_step} last step",
                g[-1:],
                lambda o, y, t: self._last_step(last_step, o, y, t, last_step_size, form, norm),
            )
        shape, n = x.shape, x.shape[0]
        if step_noise is not None:
            if tuple(step_noise.shape) != (num_steps - 1,) + tuple(shape):
                raise ValueError(
                    f"step_noise must have shape {(num_steps - 1,) + tuple(shape)}, "
                    f"got {tuple(step_noise.shape)}."
                )
        elif key is None:
            raise ValueError("SDE sampling needs a PRNG `key` (or explicit `step_noise`).")

        def out_at(y, t):
            tt = jnp.full((n,), t, jnp.float32)
            return model_fn(y, tt)[..., : y.shape[-1]], tt

        def drift(y, t):
            out, tt = out_at(y, t)
            return self._sde_drift(out, y, tt, form, norm)

        def body(y, inputs):
            i, t, given = inputs
            w = (
                given
                if step_noise is not None
                else jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            )
            scale = jnp.sqrt(2 * self.diffusion(t, form, norm)) * (w * jnp.sqrt(dt))
            if method == "Euler":
                y = y + drift(y, t) * dt + scale
            else:
                xhat = y + scale
                k1 = drift(xhat, t)
                k2 = drift(xhat + dt * k1, t + dt)
                y = xhat + 0.5 * dt * (k1 + k2)
            return y, (y if return_trajectory else None)

        steps = jnp.arange(num_steps - 1)
        given = step_noise if step_noise is not None else steps
        y, ys = jax.lax.scan(body, x, (steps, g[:-1], given))
        if last_step is not None:
            out, tt = out_at(y, g[-1])
            y = self._last_step(last_step, out, y, tt, last_step_size, form, norm)
        return jnp.concatenate([ys, y[None]]) if return_trajectory else y


def _dopri5(drift, x, grid, atol, rtol, return_trajectory, max_steps):
    """Adaptive Dormand-Prince 5(4) from grid[0] to grid[-1] (diffrax)."""
    import diffrax

    term = diffrax.ODETerm(lambda t, y, args: drift(y, t))
    saveat = diffrax.SaveAt(ts=grid) if return_trajectory else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        term,
        diffrax.Dopri5(),
        grid[0],
        grid[-1],
        None,
        x,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
    )
    return sol.ys if return_trajectory else sol.ys[0]


def from_config(config) -> Interpolant:
    """The interpolant of a run's `config.interpolant` (path, prediction, loss_weight, where a
    loss_weight of 'none' means None)."""
    weight = config.get("loss_weight", "none")
    return Interpolant(config.path, config.prediction, None if weight in ("none", None) else weight)


def create_interpolant(
    path_type: str = "Linear",
    prediction: str = "velocity",
    loss_weight: Optional[str] = None,
    train_eps: Optional[float] = None,
    sample_eps: Optional[float] = None,
) -> Interpolant:
    """The reference's `create_transport` signature."""
    return Interpolant(path_type, prediction, loss_weight, train_eps, sample_eps)


__all__ = [
    "Interpolant",
    "create_interpolant",
    "mean_flat",
    "PATHS",
    "PREDICTIONS",
    "LOSS_WEIGHTS",
    "DIFFUSION_FORMS",
    "LAST_STEPS",
    "ODE_METHODS",
    "SDE_METHODS",
]
