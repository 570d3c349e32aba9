"""The Stable Diffusion VAE (diffusers `AutoencoderKL`, as in stabilityai/sd-vae-ft-ema and
sd-vae-ft-mse) in Flax linen, with weight import from diffusers folders or the Hub.

Layout: everything is NHWC.
  encode:  images x [N, H, W, in_channels] float in [-1, 1]
           -> moments [N, H/f, W/f, 2L] float32, f = 2**(len(block_out_channels) - 1)
              (8 for the SD VAE), L = latent_channels (4): the first L channels are the
              posterior mean, the last L its raw log-variance.
  decode:  latents z [N, h, w, L] -> images [N, h*f, w*f, out_channels] float32, about
           [-1, 1] (not clipped; `images_to_uint8` clips and rounds).
  `DiagonalGaussian.from_moments(moments)` is the posterior: mean, logvar clipped to
  [-30, 20], std = exp(logvar / 2), sample(key) = mean + std * N(0, 1).

Latent scale: `VAEConfig.scaling_factor` (0.18215 for the SD VAEs) is NOT applied by
`encode`/`decode` or any function here. Latent datasets store the raw posterior; the
training input pipeline multiplies its samples by the factor and the sampler divides by it
before decoding, one place each, so that it is never applied twice.

Weights: `load_vae(folder_or_hub_id)` reads a diffusers folder (config.json +
diffusion_pytorch_model.safetensors or .bin, read without PyTorch and without executing
pickles) or downloads one with huggingface_hub. `vae_params_from_state_dict` converts a
diffusers state dict (NCHW activations, OIHW conv weights, Linear [out, in]) to the Flax
tree and accepts both attention namings: to_q/to_k/to_v/to_out.0 and the legacy
query/key/value/proj_attn (as Linear [C, C] or 1x1 conv [C, C, 1, 1] weights).

Throughput: `encode_images` / `decode_latents` run one compiled program per chunk, with
the batch split over all local devices (padded to a multiple of the device count and
unpadded after). Parameters stay float32; `dtype` (e.g. jnp.bfloat16) sets the dtype of
the convolutions, projections and normalised activations, while GroupNorm statistics, the
attention softmax and the residual sums are always float32, and so are the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax import state_dicts
from dit_jax.state_dicts import CheckpointError

Array = jax.Array

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu",)
NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

_SD_BLOCKS = (128, 256, 512, 512)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters (diffusers config.json names); defaults are the SD VAE's."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = _SD_BLOCKS
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    down_block_types: tuple = ("DownEncoderBlock2D",) * len(_SD_BLOCKS)
    up_block_types: tuple = ("UpDecoderBlock2D",) * len(_SD_BLOCKS)
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 256
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None
    force_upcast: bool = True

    def __post_init__(self):
        for name in (
            "block_out_channels",
            "down_block_types",
            "up_block_types",
            "latents_mean",
            "latents_std",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raises ValueError for a configuration this implementation does not build."""
        if self.act_fn not in ACT_FNS:
            raise ValueError(
                f"VAE config: act_fn {self.act_fn!r} is not supported; only {', '.join(ACT_FNS)}."
            )
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("VAE config: block_out_channels is empty.")
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up_block_types", self.up_block_types, UP_BLOCK_TYPES),
        ):
            bad = sorted({t for t in types if t not in allowed})
            if bad:
                raise ValueError(
                    f"VAE config: {name} contains unsupported block type(s) {', '.join(map(repr, bad))}; "
                    f"only {', '.join(allowed)} (the sd-vae-ft-ema/mse blocks) are implemented."
                )
            if len(types) != n:
                raise ValueError(
                    f"VAE config: {name} has {len(types)} entries but block_out_channels has {n}."
                )
        ints = dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
        )
        for name, value in list(ints.items()) + [
            (f"block_out_channels[{i}]", c) for i, c in enumerate(self.block_out_channels)
        ]:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VAE config: {name} must be a positive integer, got {value!r}.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAE config: block_out_channels {list(self.block_out_channels)} must all be divisible "
                f"by norm_num_groups={self.norm_num_groups} (not {bad})."
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side (8 for the SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """From a diffusers config dict; keys it lacks take the defaults (the hub sd-vae config
        has no scaling_factor, shift_factor, latents_mean/std, force_upcast, use_quant_conv,
        use_post_quant_conv or mid_block_add_attention: 0.18215, None, None, True, True, True, True)."""
        name = d.get("_class_name")
        if name is not None and name != "AutoencoderKL":
            raise ValueError(
                f"VAE config: _class_name {name!r} is not supported; only AutoencoderKL."
            )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        # a null for a field whose default is not null (e.g. scaling_factor) means "not set"
        kwargs = {
            k: v
            for k, v in d.items()
            if k in defaults and not (v is None and defaults[k] is not None)
        }
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path) -> "VAEConfig":
        """From a diffusers config.json file."""
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the VAE config ({e}).") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: not a config dict.")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """Plain dict with diffusers key names (tuples become lists)."""
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
        }


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


def _conv(
    features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = None
) -> nn.Conv:
    """kernel x kernel convolution, float32 parameters ('same' padding unless given)."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC with float32 statistics; output in `dtype`."""

    num_groups: int
    epsilon: float = NORM_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = g.mean(axes, keepdims=True)
        var = jnp.square(g - mean).mean(axes, keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (y * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus the input (1x1 conv_shortcut if channels change)."""

    out_channels: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x.astype(jnp.float32) + h  # residual sums in float32


class Downsample(nn.Module):
    """Pad right and bottom by one, then conv3x3 with stride 2 and no padding: H -> H/2."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.pad(x.astype(self.dtype), ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then conv3x3: H -> 2H."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        x = x.astype(self.dtype)
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(
            n, 2 * h, 2 * w, c
        )
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, softmax(q k^T / sqrt(C)) v, + input."""

    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        t = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(n, h * w, c)
        dense = functools.partial(nn.Dense, c, dtype=self.dtype, param_dtype=jnp.float32)
        q, k, v = (dense(name=name)(t) for name in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("ntc,nsc->nts", q, k, preferred_element_type=jnp.float32) * (c**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("nts,nsc->ntc", weights, v)
        out = dense(name="to_out_0")(out).reshape(n, h, w, c)
        return x.astype(jnp.float32) + out  # residual sums in float32


class MidBlock(nn.Module):
    """ResnetBlock, AttentionBlock (unless disabled), ResnetBlock, at constant width."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = AttentionBlock(self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """`num_layers` ResnetBlocks to `out_channels`, then an optional Downsample."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """`num_layers` ResnetBlocks to `out_channels`, then an optional Upsample."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """conv_in, down blocks, mid block, GroupNorm-SiLU-conv_out: [N,H,W,C] -> [N,H/f,W/f,2L]."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.config, self.dtype
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        x = _conv(chans[0], 3, dt, "conv_in")(x.astype(dt))
        for i, c in enumerate(chans):
            x = DownEncoderBlock(
                c,
                cfg.layers_per_block,
                groups,
                add_downsample=i < len(chans) - 1,
                dtype=dt,
                name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(chans[-1], groups, cfg.mid_block_add_attention, dt, name="mid_block")(x)
        x = nn.silu(GroupNorm(groups, dtype=dt, name="conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, 3, dt, "conv_out")(x)


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (reversed widths), GroupNorm-SiLU-conv_out: [N,h,w,L] -> [N,hf,wf,C]."""

    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg, dt = self.config, self.dtype
        chans, groups = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        x = _conv(chans[0], 3, dt, "conv_in")(z.astype(dt))
        x = MidBlock(chans[0], groups, cfg.mid_block_add_attention, dt, name="mid_block")(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock(
                c,
                cfg.layers_per_block + 1,
                groups,
                add_upsample=i < len(chans) - 1,
                dtype=dt,
                name=f"up_blocks_{i}",
            )(x)
        x = nn.silu(GroupNorm(groups, dtype=dt, name="conv_norm_out")(x))
        return _conv(cfg.out_channels, 3, dt, "conv_out")(x)


@flax.struct.dataclass
class DiagonalGaussian:
    """The VAE posterior N(mean, exp(logvar)), elementwise; arrays [N, h, w, L]."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> "DiagonalGaussian":
        """From encoder moments [..., 2L]: mean = first L channels, logvar = clip(rest, -30, 20)."""
        moments = jnp.asarray(moments, jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> Array:
        """exp(logvar / 2)."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        """exp(logvar)."""
        return jnp.exp(self.logvar)

    def mode(self) -> Array:
        """The mean."""
        return self.mean

    def sample_with_noise(self, noise: Array) -> Array:
        """mean + std * noise, with noise ~ N(0, 1) of the mean's shape."""
        return self.mean + self.std * jnp.asarray(noise, jnp.float32)

    def sample(self, key: Array) -> Array:
        """mean + std * N(0, 1) drawn from `key`."""
        return self.sample_with_noise(jax.random.normal(key, jnp.shape(self.mean), jnp.float32))


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `encode` images -> moments, `decode` latents -> images (NHWC, float32 out)."""

    config: VAEConfig
    dtype: Any = jnp.float32  # convolution / projection dtype; parameters are always float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

    def _check(self, x: Array, channels: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(
                f"VAE {what}: expected [N, H, W, {channels}] (NHWC), got shape {tuple(x.shape)}."
            )
        if x.shape[-1] != channels:
            hint = " (it looks NCHW; transpose to NHWC)" if x.shape[1] == channels else ""
            raise ValueError(
                f"VAE {what}: expected {channels} channels last (NHWC), got shape "
                f"{tuple(x.shape)}{hint}."
            )

    def encode(self, x: Array) -> Array:
        """Images [N, H, W, C] in [-1, 1] -> moments [N, H/f, W/f, 2L] float32 (mean, raw logvar)."""
        self._check(x, self.config.in_channels, "encode input")
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return moments.astype(jnp.float32)

    def posterior(self, x: Array) -> DiagonalGaussian:
        """Images -> DiagonalGaussian over latents."""
        return DiagonalGaussian.from_moments(self.encode(x))

    def decode(self, z: Array) -> Array:
        """Latents [N, h, w, L] (unscaled) -> images [N, h*f, w*f, C] float32."""
        self._check(z, self.config.latent_channels, "decode input")
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, noise: Optional[Array] = None) -> Array:
        """Reconstruction: decode(mean) or, given noise, decode(mean + std * noise)."""
        post = self.posterior(x)
        return self.decode(post.mean if noise is None else post.sample_with_noise(noise))


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------


def _dummy_images(config: VAEConfig) -> jax.ShapeDtypeStruct:
    side = config.downsample_factor
    return jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)


def abstract_params(model: AutoencoderKL) -> dict:
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct) without allocating anything."""
    variables = jax.eval_shape(
        lambda r, x: model.init({"params": r}, x), jax.random.key(0), _dummy_images(model.config)
    )
    return variables["params"]


def init_params(model: AutoencoderKL, key: Array) -> dict:
    """Random float32 parameters (flax default initialisers), for smoke runs without weights."""
    x = jnp.zeros(_dummy_images(model.config).shape, jnp.float32)
    return jax.jit(lambda r: model.init({"params": r}, x))(key)["params"]


def torch_key(path: Sequence[str]) -> str:
    """Flax path ('encoder', 'down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> diffusers name
    'encoder.down_blocks.0.resnets.1.conv1.weight' (to_out_0 -> to_out.0, scale -> weight)."""
    parts = []
    for p in path[:-1]:
        m = re.fullmatch(r"(.+)_(\d+)", p)
        parts += [m.group(1), m.group(2)] if m else [p]
    parts.append("bias" if path[-1] == "bias" else "weight")
    return ".".join(parts)


_LEGACY_ATTENTION = re.compile(
    r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$"
)
_LEGACY_TO_CURRENT = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _torch_shape(flax_shape: tuple) -> tuple:
    if len(flax_shape) == 4:  # HWIO -> OIHW
        return tuple(flax_shape[i] for i in (3, 2, 0, 1))
    return tuple(reversed(flax_shape))  # Dense [in, out] -> Linear [out, in]; 1-D unchanged


def _to_flax(path: tuple, value: np.ndarray, target_ndim: int) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if target_ndim == 4 and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if target_ndim == 2:
        if value.ndim == 4 and value.shape[2:] == (1, 1):  # attention stored as a 1x1 conv
            value = value[:, :, 0, 0]
        if value.ndim == 2:
            return value.T
    return value


def vae_params_from_state_dict(
    sd: Mapping[str, np.ndarray], config: VAEConfig, *, source: str = "state dict"
) -> dict:
    """diffusers AutoencoderKL state dict -> float32 Flax params, checking every key and shape.

    Accepts the current (to_q/to_k/to_v/to_out.0) and the legacy (query/key/value/proj_attn)
    attention names, with Linear [C, C] or 1x1 conv [C, C, 1, 1] weights. Raises
    CheckpointError listing missing, unexpected and wrong-shape keys.
    """
    renamed: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    duplicates = []
    for key, value in sd.items():
        m = _LEGACY_ATTENTION.match(key)
        new = f"{m.group(1)}{_LEGACY_TO_CURRENT[m.group(2)]}.{m.group(3)}" if m else key
        if new in renamed:
            duplicates.append(f"{origin[new]} and {key}")
            continue
        renamed[new], origin[new] = value, key
    target = abstract_params(AutoencoderKL(config))
    items, used, missing, mismatched = [], set(), [], []
    for path, leaf in traverse_util.flatten_dict(target).items():
        key = torch_key(path)
        if key not in renamed:
            missing.append(key)
            continue
        used.add(key)
        raw = renamed[key]
        if not isinstance(raw, np.ndarray) and not hasattr(raw, "__array__"):
            mismatched.append(f"{origin[key]}: a {type(raw).__name__}, not a tensor")
            continue
        raw = np.asarray(raw)
        value = _to_flax(path, raw, len(leaf.shape))
        if tuple(value.shape) != tuple(leaf.shape):
            mismatched.append(
                f"{origin[key]}: file {tuple(raw.shape)}, model {_torch_shape(tuple(leaf.shape))}"
            )
            continue
        if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
            mismatched.append(f"{origin[key]}: dtype {value.dtype}, expected floating point")
            continue
        items.append((path, np.ascontiguousarray(value.astype(np.float32))))
    unexpected = sorted(origin[k] for k in set(renamed) - used)
    if missing or unexpected or mismatched or duplicates:
        cfg = config
        lines = [
            f"{source} does not fit the VAE (block_out_channels {list(cfg.block_out_channels)}, "
            f"layers_per_block {cfg.layers_per_block}, latent_channels {cfg.latent_channels}, "
            f"mid-block attention {cfg.mid_block_add_attention}, quant_conv {cfg.use_quant_conv}, "
            f"post_quant_conv {cfg.use_post_quant_conv}):"
        ]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", mismatched),
            ("given twice (current and legacy attention names)", duplicates),
        ):
            if keys:
                shown = keys[:12] + ([f"... ({len(keys) - 12} more)"] if len(keys) > 12 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))
    return traverse_util.unflatten_dict(dict(items))


# ----------------------------------------------------------------------------------------
# Loading diffusers folders and Hub repositories
# ----------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_weights(folder: str) -> tuple[dict, str]:
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            read = (
                state_dicts.read_safetensors
                if name.endswith(".safetensors")
                else state_dicts.read_torch_file
            )
            obj = read(path)
            if not isinstance(obj, Mapping) or not all(
                isinstance(v, np.ndarray) for v in obj.values()
            ):
                raise CheckpointError(f"{path}: not a flat state dict of tensors.")
            return dict(obj), path
    raise CheckpointError(f"{folder}: no VAE weights; expected {' or '.join(WEIGHT_FILES)}.")


def _download(repo_id: str, revision: Optional[str], subfolder: Optional[str]) -> str:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to download it "
            "from the Hugging Face Hub (pip install huggingface_hub), or pass a local diffusers folder "
            "(config.json + diffusion_pytorch_model.safetensors)."
        ) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        root = None
        for weights in WEIGHT_FILES:  # the .bin only where there is no .safetensors
            root = huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=[prefix + CONFIG_FILE, prefix + weights]
            )
            if os.path.isfile(os.path.join(root, prefix + weights)):
                break
    except Exception as e:  # offline, unknown repository, gated, network errors, ...
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be downloaded from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Check the id and the network (HF_HUB_OFFLINE), or pass a local "
            "diffusers folder (config.json + diffusion_pytorch_model.safetensors)."
        ) from None
    return os.path.join(root, prefix) if prefix else root


def load_vae(
    path_or_hub_id,
    dtype=jnp.float32,
    *,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
) -> tuple[AutoencoderKL, dict]:
    """(model, float32 params) from a diffusers AutoencoderKL folder or a Hub id.

    A local folder needs config.json and diffusion_pytorch_model.safetensors (or .bin, read
    without PyTorch); a folder with a `vae/` subfolder (a whole pipeline) uses that. Anything
    that is not a local path and looks like "owner/name" (e.g. "stabilityai/sd-vae-ft-ema") is
    fetched with huggingface_hub.snapshot_download. `dtype` is the model's compute dtype.
    The scaling factor is `model.config.scaling_factor`; it is not applied by the model.
    """
    source = os.fspath(path_or_hub_id)
    if os.path.exists(source):
        folder = os.path.join(source, subfolder) if subfolder else source
        if not os.path.isdir(folder):
            raise CheckpointError(
                f"{folder}: expected a diffusers VAE folder (config.json + "
                f"{WEIGHT_FILES[0]}), not a file."
            )
        if (
            not subfolder
            and not os.path.isfile(os.path.join(folder, CONFIG_FILE))
            and os.path.isfile(os.path.join(folder, "vae", CONFIG_FILE))
        ):
            folder = os.path.join(folder, "vae")
    elif _HUB_ID.match(source) and not source.startswith((".", "~")):
        folder = _download(source, revision, subfolder)
    else:
        raise CheckpointError(
            f"{source}: no such folder (and not a Hugging Face Hub id like "
            "'stabilityai/sd-vae-ft-ema')."
        )
    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; not a diffusers VAE folder.")
    try:
        config = VAEConfig.from_json(config_path)
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{config_path}: {e}") from None
    sd, weights_path = _read_weights(folder)
    params = vae_params_from_state_dict(sd, config, source=weights_path)
    return AutoencoderKL(config, dtype=dtype), params


# ----------------------------------------------------------------------------------------
# Batched, sharded encode / decode
# ----------------------------------------------------------------------------------------

_AXIS = "batch"


def _mesh(devices: Optional[Sequence[jax.Device]]) -> Mesh:
    devices = tuple(devices if devices is not None else jax.local_devices())
    return Mesh(
        np.asarray(devices, dtype=object), (_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicate_params(params, devices: Optional[Sequence[jax.Device]] = None):
    """Parameters placed once on every device (saves a host-to-device copy per call)."""
    return jax.device_put(params, NamedSharding(_mesh(devices), P()))


def _prepare_images(x: Array) -> Array:
    """uint8 [0, 255] -> float32 [-1, 1]; floats pass through as float32."""
    if x.dtype == jnp.uint8:
        return x.astype(jnp.float32) / 127.5 - 1.0
    return x.astype(jnp.float32)


@functools.lru_cache(maxsize=64)
def _compiled(model: AutoencoderKL, method: str, devices: tuple):
    mesh = _mesh(devices)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(_AXIS))
    if method == "encode":

        def fn(params, x):
            return model.apply({"params": params}, _prepare_images(x), method="encode")
    else:

        def fn(params, z):
            return model.apply({"params": params}, z, method="decode")

    return jax.jit(fn, in_shardings=(replicated, split), out_shardings=split), replicated, split


def _run_batched(
    model: AutoencoderKL,
    params,
    inputs,
    method: str,
    dtype,
    batch_size: Optional[int],
    devices: Optional[Sequence[jax.Device]],
) -> np.ndarray:
    if dtype is not None and jnp.dtype(dtype) != jnp.dtype(model.dtype):
        model = model.clone(dtype=dtype)
    devices = tuple(devices if devices is not None else jax.local_devices())
    fn, replicated, split = _compiled(model, method, devices)
    params = jax.device_put(params, replicated)
    inputs = np.asarray(inputs) if not isinstance(inputs, jax.Array) else inputs
    if inputs.ndim != 4:
        raise ValueError(
            f"VAE {method}: expected a batch [N, H, W, C] (NHWC), got shape {tuple(inputs.shape)}."
        )
    n, d = inputs.shape[0], len(devices)
    if n == 0:
        raise ValueError(f"VAE {method}: empty batch.")
    chunk = min(batch_size or n, n)
    chunk = -(-chunk // d) * d  # a multiple of the device count; every chunk is padded to it
    outputs, pending = [], None
    for start in range(0, n, chunk):
        part = inputs[start : start + chunk]
        valid = part.shape[0]
        if valid < chunk:
            pad = [(0, chunk - valid)] + [(0, 0)] * (part.ndim - 1)
            part = (
                np.pad(np.asarray(part), pad)
                if isinstance(part, np.ndarray)
                else jnp.pad(part, pad)
            )
        out = fn(params, jax.device_put(part, split))
        if pending is not None:  # fetch the previous chunk while this one runs
            outputs.append(np.asarray(pending[0])[: pending[1]])
        pending = (out, valid)
    outputs.append(np.asarray(pending[0])[: pending[1]])
    return np.concatenate(outputs, axis=0)


def encode_moments(
    model: AutoencoderKL,
    params,
    images,
    *,
    dtype=None,
    batch_size: Optional[int] = None,
    devices: Optional[Sequence[jax.Device]] = None,
) -> np.ndarray:
    """Images [N, H, W, C] (uint8 in [0, 255] or float in [-1, 1]) -> moments [N, h, w, 2L]
    float32 numpy, split over `devices` (default: all local devices) in chunks of `batch_size`."""
    return _run_batched(model, params, images, "encode", dtype, batch_size, devices)


def encode_images(
    model: AutoencoderKL,
    params,
    images,
    *,
    dtype=None,
    batch_size: Optional[int] = None,
    devices: Optional[Sequence[jax.Device]] = None,
) -> DiagonalGaussian:
    """Images [N, H, W, C] (uint8 [0, 255] or float [-1, 1]) -> the posterior over unscaled
    latents [N, h, w, L] (numpy float32 mean and logvar). Multiply a sample or the mean by
    `model.config.scaling_factor` where the latents are stored."""
    moments = encode_moments(
        model, params, images, dtype=dtype, batch_size=batch_size, devices=devices
    )
    latent = moments.shape[-1] // 2
    return DiagonalGaussian(moments[..., :latent], np.clip(moments[..., latent:], *LOGVAR_RANGE))


def decode_latents(
    model: AutoencoderKL,
    params,
    latents,
    *,
    dtype=None,
    batch_size: Optional[int] = None,
    devices: Optional[Sequence[jax.Device]] = None,
) -> np.ndarray:
    """Unscaled latents [N, h, w, L] (divide by `model.config.scaling_factor` first) -> images
    [N, h*f, w*f, C] float32 numpy in about [-1, 1], split over `devices` in chunks."""
    return _run_batched(model, params, latents, "decode", dtype, batch_size, devices)


def images_to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 as the DiT sampling script does: clip(127.5 x + 128, 0, 255),
    truncated."""
    return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)
