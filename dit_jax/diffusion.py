"""Gaussian diffusion as DiT uses it (the ADM / improved-DDPM formulation), in JAX.

Schedule constants are computed in float64 with numpy and cast to float32 when gathered at
timesteps, exactly as the reference does. Tensors are NHWC; the model's output has the
epsilon prediction in the first C channels and, with learned sigma, the variance
interpolation value v in the last C: log var = frac * log(beta_t) + (1 - frac) *
log(posterior variance clipped), frac = (v + 1) / 2.

Samplers are single compiled loops (`jax.lax.scan`): call them inside `jax.jit`. A model
function has the signature `model_fn(x [N,H,W,C], t [N] int32) -> [N,H,W,C_out]`, where t
is on the *original* 1000-step scale: respaced processes map their indices through
`timestep_map` before calling it. Classifier-free guidance is a model function too
(`cfg_model_fn`), so every sampler supports it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import models

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


# ----------------------------------------------------------------------------------------
# Schedules and respacing
# ----------------------------------------------------------------------------------------


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
            for i in range(num_steps)
        ],
        dtype=np.float64,
    )


def named_beta_schedule(name: str, num_steps: int = 1000) -> np.ndarray:
    """'linear' (1e-4..0.02, scaled to 1000 steps) or 'cosine' (Nichol & Dhariwal), float64."""
    if name == "linear":
        scale = 1000 / num_steps
        return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_steps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"Unknown noise schedule {name!r}; choose 'linear' or 'cosine'.")


def space_timesteps(num_steps: int, spacing: Union[str, Sequence[int]]) -> list[int]:
    """The original timesteps kept by a respacing, sorted.

    spacing: "250" (250 evenly strided steps), "25,10,5" (the range split in equal sections
    with that many steps each), "ddim50" (an integer stride giving exactly 50 steps), or a
    list of section counts. "" keeps every step.
    """
    if isinstance(spacing, str):
        spacing = spacing.strip()
        if spacing == "":
            return list(range(num_steps))
        if spacing.startswith("ddim"):
            try:
                want = int(spacing[4:])
            except ValueError:
                raise ValueError(
                    f"Bad respacing {spacing!r}: expected 'ddimN' with an integer N."
                ) from None
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == want:
                    return list(range(0, num_steps, stride))
            raise ValueError(
                f"Cannot make exactly {want} steps out of {num_steps} with an integer stride."
            )
        try:
            sections = [int(s) for s in spacing.split(",")]
        except ValueError:
            raise ValueError(
                f"Bad respacing {spacing!r}: expected e.g. '250', '25,10,5' or 'ddim50'."
            ) from None
    else:
        sections = list(spacing)
    size_per, extra = divmod(num_steps, len(sections))
    start, steps = 0, []
    for i, count in enumerate(sections):
        size = size_per + (1 if i < extra else 0)
        if not 0 < count <= size:
            raise ValueError(
                f"Cannot take {count} steps from a section of {size} steps (respacing {spacing!r})."
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(steps))


# ----------------------------------------------------------------------------------------
# Gaussian helpers
# ----------------------------------------------------------------------------------------


def mean_flat(x: Array) -> Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data x in [-1, 1] discretised to 256 bins, elementwise, in nats."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


# ----------------------------------------------------------------------------------------
# The diffusion process
# ----------------------------------------------------------------------------------------

MODEL_VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse")


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A (possibly respaced) diffusion process. Index i in [0, num_timesteps) is a step of
    this process; `timestep_map[i]` is the original timestep the model is called with."""

    betas: np.ndarray
    timestep_map: np.ndarray
    model_var_type: str = "learned_range"
    loss_type: str = "rescaled_mse"
    original_num_steps: int = 1000

    def __post_init__(self):
        betas = np.asarray(self.betas, np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1].")
        if self.model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(
                f"model_var_type must be one of {MODEL_VAR_TYPES}, got {self.model_var_type!r}."
            )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        c = dict(
            betas=betas,
            log_betas=np.log(betas),
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            alphas_cumprod_next=np.append(ac[1:], 0.0),
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
        )
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        c.update(
            posterior_variance=post_var,
            # the first posterior variance is 0; clip the log by using the second one there
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            # fixed_large: beta_t, with the posterior variance at t = 0 (a better decoder)
            fixed_large_variance=np.append(post_var[1], betas[1:]),
            fixed_large_log_variance=np.log(np.append(post_var[1], betas[1:])),
        )
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "timestep_map", np.asarray(self.timestep_map, np.int64))
        object.__setattr__(self, "consts", c)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    # -- gathering ------------------------------------------------------------------------
    def _extract(self, name: str, t: Array, ndim: int) -> Array:
        """consts[name][t] as float32, shaped [N, 1, 1, ...] to broadcast against an ndim tensor."""
        arr = jnp.asarray(self.consts[name].astype(np.float32))
        out = arr[t]
        return out.reshape(out.shape + (1,) * (ndim - 1))

    def model_timesteps(self, t: Array) -> Array:
        return jnp.asarray(self.timestep_map, jnp.int32)[t]

    # -- forward process ------------------------------------------------------------------
    def q_sample(self, x_start: Array, t: Array, noise: Array) -> Array:
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(self, x_start: Array, x_t: Array, t: Array):
        n = x_t.ndim
        mean = (
            self._extract("posterior_mean_coef1", t, n) * x_start
            + self._extract("posterior_mean_coef2", t, n) * x_t
        )
        return (
            mean,
            self._extract("posterior_variance", t, n),
            self._extract("posterior_log_variance_clipped", t, n),
        )

    def predict_xstart_from_eps(self, x_t: Array, t: Array, eps: Array) -> Array:
        n = x_t.ndim
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, n) * eps
        )

    def predict_eps_from_xstart(self, x_t: Array, t: Array, pred_xstart: Array) -> Array:
        n = x_t.ndim
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, n)

    # -- reverse process ------------------------------------------------------------------
    def p_mean_variance_from_output(
        self, model_output: Array, x: Array, t: Array, clip_denoised: bool = False
    ) -> dict:
        """p(x_{t-1} | x_t) from a model output already computed at (x, t)."""
        n, c = x.ndim, x.shape[-1]
        if self.model_var_type == "learned_range":
            if model_output.shape[-1] != 2 * c:
                raise ValueError(
                    f"learned sigma needs {2 * c} output channels, the model gave {model_output.shape[-1]}."
                )
            eps, v = model_output[..., :c], model_output[..., c:]
            min_log = self._extract("posterior_log_variance_clipped", t, n)
            max_log = self._extract("log_betas", t, n)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            eps = model_output[..., :c]
            if self.model_var_type == "fixed_small":
                variance = self._extract("posterior_variance", t, n)
                log_variance = self._extract("posterior_log_variance_clipped", t, n)
            else:
                variance = self._extract("fixed_large_variance", t, n)
                log_variance = self._extract("fixed_large_log_variance", t, n)
            variance = jnp.broadcast_to(variance, x.shape)
            log_variance = jnp.broadcast_to(log_variance, x.shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(
            mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
        )

    def p_mean_variance(
        self, model_fn: ModelFn, x: Array, t: Array, clip_denoised: bool = False
    ) -> dict:
        """t: [N] indices of this (possibly respaced) process."""
        out = model_fn(x, self.model_timesteps(t))
        return self.p_mean_variance_from_output(out, x, t, clip_denoised)

    # -- training losses ------------------------------------------------------------------
    def training_losses(self, model_fn: ModelFn, x_start: Array, t: Array, noise: Array) -> dict:
        """Hybrid loss per example: mse(eps) + vb (bits per dim, rescaled by T/1000 for
        'rescaled_mse'). The vb term sees the mean output through a stop-gradient, so it only
        trains the variance. Returns {'loss', 'mse', 'vb', 'x_t'} with [N] terms."""
        x_t = self.q_sample(x_start, t, noise)
        out = model_fn(x_t, self.model_timesteps(t))
        c = x_start.shape[-1]
        terms = {"x_t": x_t, "mse": mean_flat((noise - out[..., :c]) ** 2)}
        if self.model_var_type == "learned_range":
            frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :c]), out[..., c:]], axis=-1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == "rescaled_mse":
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
            terms["loss"] = terms["mse"] + vb
        else:
            terms["vb"] = jnp.zeros_like(terms["mse"])
            terms["loss"] = terms["mse"]
        return terms

    def vb_terms_bpd(self, model_output: Array, x_start: Array, x_t: Array, t: Array) -> Array:
        """The variational bound term of step t in bits per dim: KL(q || p) for t > 0, the
        discretised decoder NLL at t == 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t)
        kl = mean_flat(
            normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        ) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return jnp.where(t == 0, nll, kl)

    # -- samplers -------------------------------------------------------------------------
    def _step_noises(self, shape, key: Optional[Array], step_noise: Optional[Array]):
        """Per-step noise: given explicitly ([num_steps, *shape], step 0 = noisiest) or drawn
        from `key` folded with the step number."""
        if step_noise is not None:
            if tuple(step_noise.shape) != (self.num_timesteps,) + tuple(shape):
                raise ValueError(
                    f"step_noise must have shape {(self.num_timesteps,) + tuple(shape)}, got {step_noise.shape}."
                )
            return lambda i, given: given, step_noise
        if key is None:
            return lambda i, given: jnp.zeros(shape, jnp.float32), None
        return lambda i, given: jax.random.normal(
            jax.random.fold_in(key, i), shape, jnp.float32
        ), None

    def p_sample(
        self, model_fn: ModelFn, x: Array, t: Array, noise: Array, clip_denoised: bool = False
    ) -> dict:
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        out["sample"] = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise
        return out

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: Array,
        *,
        key: Optional[Array] = None,
        step_noise: Optional[Array] = None,
        clip_denoised: bool = False,
    ) -> Array:
        """Ancestral DDPM sampling from x_T = `noise` down to x_0, one `lax.scan`."""
        if key is None and step_noise is None:
            raise ValueError("DDPM sampling needs a PRNG `key` (or explicit `step_noise`).")
        draw, given = self._step_noises(noise.shape, key, step_noise)
        n = noise.shape[0]

        def body(x, inputs):
            i, g = inputs
            t = jnp.full((n,), self.num_timesteps - 1 - i, jnp.int32)
            return self.p_sample(model_fn, x, t, draw(i, g), clip_denoised)["sample"], None

        steps = jnp.arange(self.num_timesteps)
        x, _ = jax.lax.scan(body, noise, (steps, given if given is not None else steps))
        return x

    def ddim_sample(
        self,
        model_fn: ModelFn,
        x: Array,
        t: Array,
        noise: Array,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> Array:
        n = x.ndim
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab = self._extract("alphas_cumprod", t, n)
        ab_prev = self._extract("alphas_cumprod_prev", t, n)
        sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
        mean = out["pred_xstart"] * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma**2) * eps
        nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (n - 1))
        return mean + nonzero * sigma * noise

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        noise: Array,
        *,
        eta: float = 0.0,
        key: Optional[Array] = None,
        step_noise: Optional[Array] = None,
        clip_denoised: bool = False,
    ) -> Array:
        """DDIM sampling from x_T = `noise`; deterministic for eta = 0 (no key needed)."""
        if eta != 0 and key is None and step_noise is None:
            raise ValueError("DDIM with eta > 0 needs a PRNG `key` (or explicit `step_noise`).")
        draw, given = self._step_noises(noise.shape, key, step_noise)
        n = noise.shape[0]

        def body(x, inputs):
            i, g = inputs
            t = jnp.full((n,), self.num_timesteps - 1 - i, jnp.int32)
            return self.ddim_sample(model_fn, x, t, draw(i, g), eta, clip_denoised), None

        steps = jnp.arange(self.num_timesteps)
        x, _ = jax.lax.scan(body, noise, (steps, given if given is not None else steps))
        return x

    def ddim_reverse_sample(
        self, model_fn: ModelFn, x: Array, t: Array, clip_denoised: bool = False
    ) -> Array:
        """One deterministic DDIM step towards noise: x at index t -> x at index t + 1."""
        n = x.ndim
        out = self.p_mean_variance(model_fn, x, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        ab_next = self._extract("alphas_cumprod_next", t, n)
        return out["pred_xstart"] * jnp.sqrt(ab_next) + jnp.sqrt(1 - ab_next) * eps

    def ddim_reverse_sample_loop(
        self, model_fn: ModelFn, x_start: Array, clip_denoised: bool = False
    ) -> Array:
        """DDIM inversion: x_0 -> x_T. `ddim_sample_loop` (eta=0) from the result reconstructs x_0."""
        n = x_start.shape[0]

        def body(x, i):
            return self.ddim_reverse_sample(
                model_fn, x, jnp.full((n,), i, jnp.int32), clip_denoised
            ), None

        x, _ = jax.lax.scan(body, x_start, jnp.arange(self.num_timesteps))
        return x


def create_diffusion(
    timestep_respacing: Union[str, Sequence[int], None] = "",
    *,
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    learn_sigma: bool = True,
    sigma_small: bool = False,
    rescale_learned_sigmas: bool = True,
) -> GaussianDiffusion:
    """The diffusion DiT uses: `create_diffusion("")` for training (1000 steps),
    `create_diffusion("250")` for sampling, `create_diffusion("ddim50")` for DDIM.

    The same arguments return the same (immutable) object, so it can be a static argument
    of `jax.jit` without recompiling."""
    spacing = (
        timestep_respacing
        if isinstance(timestep_respacing, str) or timestep_respacing is None
        else tuple(timestep_respacing)
    )
    return _create_diffusion(
        spacing, noise_schedule, diffusion_steps, learn_sigma, sigma_small, rescale_learned_sigmas
    )


@functools.lru_cache(maxsize=64)
def _create_diffusion(
    timestep_respacing,
    noise_schedule,
    diffusion_steps,
    learn_sigma,
    sigma_small,
    rescale_learned_sigmas,
) -> GaussianDiffusion:
    betas = named_beta_schedule(noise_schedule, diffusion_steps)
    keep = space_timesteps(diffusion_steps, timestep_respacing or "")
    ac = np.cumprod(1.0 - betas)
    last, new_betas = 1.0, []
    for i in keep:
        new_betas.append(1.0 - ac[i] / last)
        last = ac[i]
    var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    return GaussianDiffusion(
        betas=np.array(new_betas),
        timestep_map=np.array(keep),
        model_var_type=var_type,
        loss_type="rescaled_mse" if rescale_learned_sigmas else "mse",
        original_num_steps=diffusion_steps,
    )


def cfg_model_fn(
    apply_fn: Callable[..., Array],
    labels: Array,
    null_label: int,
    cfg_scale: float,
    guidance_channels: Optional[int] = 3,
    guidance_interval: Optional[tuple[float, float]] = None,
) -> ModelFn:
    """A guided model function over B samples: runs `apply_fn(x2, t2, y2)` once on the doubled
    batch (conditional labels, then null labels) and mixes the halves with
    `models.classifier_free_guidance` (guidance_channels=3: the official sampler's first three
    channels; None: every epsilon channel). Variance channels come from the conditional half.

    guidance_interval=(lo, hi) guides only where lo <= t <= hi, t being the model's timestep
    input (DDPM: training timesteps 0..T-1, high is noisy); elsewhere the conditional output is
    used as it is (Kynkaanniemi et al. 2024: guidance at the noisiest and the cleanest levels
    hurts or does nothing).
    """
    y2 = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

    def fn(x, t):
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), y2)
        guided = models.classifier_free_guidance(out, cfg_scale, x.shape[-1], guidance_channels)
        guided = guided[: x.shape[0]]
        if guidance_interval is None:
            return guided
        lo, hi = guidance_interval
        inside = ((t >= lo) & (t <= hi)).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(inside, guided, out[: x.shape[0]])

    return fn
