"""DiT: Diffusion Transformers (Peebles & Xie 2023) in Flax linen.

Layout: images/latents are NHWC. A DiT maps (x: [N, H, W, C] float, t: [N] timesteps,
y: [N] int class labels) to [N, H, W, C_out], where C_out = 2*C with learned sigma (the
first C channels are the epsilon prediction, the last C the variance interpolation value).

Tokens are patches in row-major order (patch row, then column); each output token holds a
p x p x C_out patch flattened as (row, column, channel), which is the layout of the
official PyTorch model's final linear layer, so imported weights need no permutation.

Every named variant ("DiT-XL/2" or "XL/2") decodes to depth/width/heads/patch in one place:
`model_kwargs_from_name`. Parameters carry logical axis names ('embed', 'mlp', 'heads',
'vocab') for sharding; the rules that map them onto a mesh live in the config.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import einops
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Array = jax.Array

# ----------------------------------------------------------------------------------------
# The model family
# ----------------------------------------------------------------------------------------

#: size name -> (depth, hidden_size, num_heads), as in the paper's Table 1.
MODEL_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
#: The 12 named configs of the paper, "DiT-S/2" ... "DiT-XL/8".
MODEL_NAMES = tuple(f"DiT-{s}/{p}" for s in MODEL_SIZES for p in PATCH_SIZES)

BLOCK_TYPES = ("adaln_zero", "adaln", "cross_attn", "in_context")
#: remat_policy -> the jax.checkpoint policy of a rematerialised block (None: save nothing).
REMAT_POLICIES = {
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

#: DiT fields that make the forward diffusers' DiTTransformer2DModel's (same weights): its
#: timestep frequencies are 10000 ** (-i / 127) instead of 10000 ** (-i / 128), and its
#: pre-MLP LayerNorm (norm3 there) has eps 1e-5 (its config's norm_eps) instead of 1e-6.
DIFFUSERS_FORWARD = dict(timestep_freq_shift=1, mlp_norm_eps=1e-5)

_NAME_RE = re.compile(r"^(?:DiT[-_])?(S|B|L|XL)[/_-]?(\d+)$", re.IGNORECASE)


def model_kwargs_from_name(name: str) -> dict:
    """Decodes "DiT-XL/2", "XL/2", "dit_xl_2" into {depth, hidden_size, num_heads, patch_size}."""
    match = _NAME_RE.match(name.strip())
    if match is None or match.group(1).upper() not in MODEL_SIZES:
        raise ValueError(
            f"Unknown model name {name!r}; valid names are {', '.join(MODEL_NAMES)} "
            "(the 'DiT-' prefix is optional), or give depth/hidden_size/num_heads/patch_size."
        )
    size, patch = match.group(1).upper(), int(match.group(2))
    if patch not in PATCH_SIZES:
        raise ValueError(
            f"Unknown model name {name!r}: patch size {patch} is not one of "
            f"{PATCH_SIZES}; valid names are {', '.join(MODEL_NAMES)}."
        )
    depth, hidden, heads = MODEL_SIZES[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)


def canonical_name(name: str) -> str:
    kw = model_kwargs_from_name(name)
    size = next(
        s for s, v in MODEL_SIZES.items() if v == (kw["depth"], kw["hidden_size"], kw["num_heads"])
    )
    return f"DiT-{size}/{kw['patch_size']}"


def create_model(name: Optional[str] = None, **kwargs) -> "DiT":
    """A DiT from a variant name plus overrides (input_size, num_classes, dtype, ...)."""
    base = model_kwargs_from_name(name) if name else {}
    base.update(kwargs)
    return DiT(**base)


def model_from_config(config) -> "DiT":
    """A DiT from a dict/ConfigDict of constructor fields; a 'name' entry gives the size and
    the other entries override it."""
    config = dict(config)
    name = config.pop("name", None)
    fields = {f for f in DiT.__dataclass_fields__ if f not in ("parent", "name")}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"Unknown model config keys {unknown}; valid keys are {sorted(fields)}.")
    return create_model(name if name and name != "custom" else None, **config)


# ----------------------------------------------------------------------------------------
# Fixed embeddings
# ----------------------------------------------------------------------------------------


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, embed_dim]: sin of the first half of the frequencies, then cos."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """[grid_size**2, embed_dim] fixed 2-D position embedding, tokens in row-major order.

    As in the reference (MAE) code, the first half of the channels encodes the column
    index and the second half the row index.
    """
    if embed_dim % 4:
        raise ValueError(
            f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {embed_dim}"
        )
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate(
        [sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1
    )


def timestep_embedding(
    t: Array, dim: int, max_period: float = 10000.0, freq_shift: int = 0
) -> Array:
    """[N] (possibly fractional) timesteps -> [N, dim] float32: cos of the frequencies, then sin.

    Frequency i is max_period ** (-i / (dim // 2 - freq_shift)): the official DiT has
    freq_shift 0, diffusers' DiT (Timesteps(downscale_freq_shift=1)) has 1."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    freqs = jnp.exp(exponent / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
normal002 = nn.initializers.normal(stddev=0.02)


def dense(
    features: int,
    names: tuple,
    *,
    kernel_init=xavier,
    dtype=jnp.float32,
    use_bias: bool = True,
    name: Optional[str] = None,
) -> nn.Dense:
    """nn.Dense whose kernel [in, out] carries the logical axis names `names`."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, names),
        bias_init=nn.with_logical_partitioning(zeros, (names[1],)),
    )


def layer_norm(affine: bool, dtype, name=None, eps: float = 1e-6) -> nn.LayerNorm:
    """LayerNorm over the last axis, eps 1e-6 (no affine parameters inside adaLN blocks)."""
    return nn.LayerNorm(
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """x: [N, T, D]; shift, scale: [N, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def attention_implementation(requested: Optional[str], backend: Optional[str] = None) -> str:
    """'cudnn' (flash attention) only where it exists; 'einsum' (`attend`) elsewhere. backend:
    the platform the model will run on (default: jax's default backend)."""
    if requested in (None, "auto"):
        return "cudnn" if (backend or jax.default_backend()) == "gpu" else "einsum"
    return requested


def attend(q: Array, k: Array, v: Array) -> Array:
    """softmax(q k^T / sqrt(e)) v for q: [N, T, H, E], k, v: [N, S, H, E] -> [N, T, H, E].

    The computation of `jax.nn.dot_product_attention(implementation='xla')` (logits and
    softmax in float32, probabilities cast to v's dtype) without its mask machinery: with no
    mask, that implementation still builds and selects through a [N, H, T, S] mask in the
    forward and the backward, a large share of the CPU step at 256 tokens."""
    scale = jnp.float32(q.shape[-1] ** -0.5)
    logits = jnp.einsum("nthe,nshe->nhts", q, k, preferred_element_type=jnp.float32) * scale
    weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
    # Normalise the [N, T, H, E] output rather than the [N, H, T, S] weights: one pass over
    # the large array fewer, forward and backward.
    total = jnp.einsum("nhts->nth", weights)[..., None]
    out = jnp.einsum(
        "nhts,nshe->nthe", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention.

    x: [N, T, D], context: [N, S, D] -> [N, T, D]. Softmax(q k^T / sqrt(head_dim)) v.
    """

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32
    implementation: Optional[str] = None

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None) -> Array:
        d, h = self.hidden_size, self.num_heads
        if context is None:
            # jnp.split, not indexing: its gradient is one concatenate, not three pads + adds.
            qkv = dense(3 * d, ("embed", "mlp"), dtype=self.dtype, name="qkv")(x)
            q, k, v = (a.reshape(*a.shape[:-1], h, d // h) for a in jnp.split(qkv, 3, axis=-1))
        else:
            q = einops.rearrange(
                dense(d, ("embed", "mlp"), dtype=self.dtype, name="q")(x),
                "n t (h e) -> n t h e",
                h=h,
            )
            kv = dense(2 * d, ("embed", "mlp"), dtype=self.dtype, name="kv")(context)
            k, v = (a.reshape(*a.shape[:-1], h, d // h) for a in jnp.split(kv, 2, axis=-1))
        impl = attention_implementation(self.implementation)
        if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
            impl = "xla"  # cuDNN flash attention needs half precision inputs
        # Measured on CPU (BENCHMARKS.md): `attend` speeds up S/2's 256-token train step by ~14%
        # over XLA's implementation, but slows B/4's 64-token one by ~9%.
        if impl == "einsum" and q.shape[1] * k.shape[1] >= 128 * 128:
            out = attend(q, k, v)
        elif impl == "einsum":
            out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=impl)
        out = einops.rearrange(out, "n t h e -> n t (h e)")
        return dense(d, ("mlp", "embed"), dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    hidden_size: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=True)
        return dense(self.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class TimestepEmbedder(nn.Module):
    """[N] timesteps -> [N, D]: 256 sinusoidal frequencies -> Linear -> SiLU -> Linear."""

    hidden_size: int
    frequency_embedding_size: int = 256
    dtype: Any = jnp.float32
    freq_shift: int = 0

    @nn.compact
    def __call__(self, t: Array) -> Array:
        emb = timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        emb = emb.astype(self.dtype)
        emb = dense(
            self.hidden_size, (None, "embed"), kernel_init=normal002, dtype=self.dtype, name="mlp_0"
        )(emb)
        emb = nn.silu(emb)
        return dense(
            self.hidden_size,
            ("embed", "mlp"),
            kernel_init=normal002,
            dtype=self.dtype,
            name="mlp_2",
        )(emb)


class LabelEmbedder(nn.Module):
    """[N] labels -> [N, D]. Row `num_classes` is the null class used for classifier-free
    guidance; in training, labels are replaced by it with probability `dropout_prob`, drawn
    from the 'label_dropout' PRNG stream."""

    num_classes: int
    hidden_size: int
    dropout_prob: float

    @nn.compact
    def __call__(self, labels: Array, train: bool, force_drop_ids: Optional[Array] = None) -> Array:
        rows = self.num_classes + int(self.dropout_prob > 0)
        table = self.param(
            "embedding_table",
            nn.with_logical_partitioning(normal002, ("vocab", "embed")),
            (rows, self.hidden_size),
            jnp.float32,
        )
        if force_drop_ids is not None:
            labels = jnp.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = (
                jax.random.uniform(self.make_rng("label_dropout"), labels.shape) < self.dropout_prob
            )
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0)


class DiTBlock(nn.Module):
    """One transformer block, x: [N, T, D], c: [N, D] (the summed t and y embedding).

    block_type:
      adaln_zero: LayerNorms without affine; shift/scale/gate for attention and MLP regressed
                  from c by SiLU -> Linear(6D), zero-initialised so each block starts as identity.
      adaln:      the same shift/scale (Linear(4D), xavier init), no gates.
      cross_attn: pre-LN self-attention, cross-attention to `cond` ([N, 2, D]: t and y tokens), MLP.
      in_context: a plain pre-LN ViT block; t and y are tokens in the sequence.
    """

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    block_type: str = "adaln_zero"
    dtype: Any = jnp.float32
    attention: Optional[str] = None
    mlp_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array, c: Array, cond: Optional[Array] = None) -> Array:
        d = self.hidden_size
        attn = Attention(d, self.num_heads, self.dtype, self.attention, name="attn")
        mlp = Mlp(d, int(d * self.mlp_ratio), self.dtype, name="mlp")
        if self.block_type in ("adaln_zero", "adaln"):
            zero = self.block_type == "adaln_zero"
            chunks = 6 if zero else 4
            mod = dense(
                chunks * d,
                ("embed", "mlp"),
                kernel_init=zeros if zero else xavier,
                dtype=self.dtype,
                name="adaLN_modulation",
            )(nn.silu(c))
            mod = jnp.split(mod, chunks, axis=-1)
            norm1 = layer_norm(False, self.dtype, "norm1")
            norm2 = layer_norm(False, self.dtype, "norm2", self.mlp_norm_eps)
            if zero:
                shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
                x = x + gate_msa[:, None] * attn(modulate(norm1(x), shift_msa, scale_msa))
                x = x + gate_mlp[:, None] * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
            else:
                shift_msa, scale_msa, shift_mlp, scale_mlp = mod
                x = x + attn(modulate(norm1(x), shift_msa, scale_msa))
                x = x + mlp(modulate(norm2(x), shift_mlp, scale_mlp))
            return x
        x = x + attn(layer_norm(True, self.dtype, "norm1")(x))
        if self.block_type == "cross_attn":
            cross = Attention(d, self.num_heads, self.dtype, self.attention, name="cross_attn")
            x = x + cross(layer_norm(True, self.dtype, "norm_cross")(x), cond)
        return x + mlp(layer_norm(True, self.dtype, "norm2", self.mlp_norm_eps)(x))


class FinalLayer(nn.Module):
    """[N, T, D] -> [N, T, p*p*C_out]. adaLN designs modulate the final LayerNorm from c;
    the output projection (and, for adaLN-Zero, the modulation) starts at zero."""

    hidden_size: int
    patch_size: int
    out_channels: int
    block_type: str = "adaln_zero"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, c: Array) -> Array:
        zero = self.block_type == "adaln_zero"
        if self.block_type in ("adaln_zero", "adaln"):
            mod = dense(
                2 * self.hidden_size,
                ("embed", "mlp"),
                kernel_init=zeros if zero else xavier,
                dtype=self.dtype,
                name="adaLN_modulation",
            )(nn.silu(c))
            shift, scale = jnp.split(mod, 2, axis=-1)
            x = modulate(layer_norm(False, self.dtype, "norm_final")(x), shift, scale)
        else:
            x = layer_norm(True, self.dtype, "norm_final")(x)
        out = self.patch_size * self.patch_size * self.out_channels
        return dense(out, ("embed", None), kernel_init=zeros, dtype=self.dtype, name="linear")(x)


# ----------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone.

    Call: model.apply(variables, x [N,H,W,C], t [N], y [N], train=False) -> [N,H,W,C_out].
    With train=True and class_dropout_prob > 0, pass rngs={'label_dropout': key}.

    `pos_embed` is stored as a parameter (so official checkpoints round-trip and parameter
    counts match the reference) but is a fixed sin-cos table: the forward pass stops its
    gradient and the optimizer must leave it alone (see `trainable_mask`).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    block_type: str = "adaln_zero"
    dtype: Any = jnp.float32  # activation / matmul dtype; parameters are always float32
    attention: Optional[str] = None  # None: cuDNN flash on GPU, XLA elsewhere
    remat: bool = False  # rematerialise each block in the backward pass
    # What a rematerialised block keeps from its forward (REMAT_POLICIES): 'nothing' recomputes
    # the whole block; 'dots' keeps the outputs of its dense layers and recomputes the rest.
    remat_policy: str = "nothing"
    # One block traced and compiled once, run `depth` times by lax.scan: parameters are stacked
    # under 'blocks' with a leading [depth] axis (logical axis 'layers') instead of blocks_0..
    # blocks_{depth-1}. Same function; `params_in_layout` converts between the two layouts.
    scan_blocks: bool = False
    # The forward's two numerical conventions; the defaults are the official DiT's, and
    # DIFFUSERS_FORWARD (shift 1, eps 1e-5) reproduces diffusers' DiTTransformer2DModel.
    timestep_freq_shift: int = 0  # timestep frequencies max_period ** (-i / (128 - shift))
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before each block's MLP

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def check_config(self):
        bad = [
            f"{k}={getattr(self, k)}"
            for k in (
                "input_size",
                "patch_size",
                "in_channels",
                "hidden_size",
                "depth",
                "num_heads",
            )
            if getattr(self, k) <= 0
        ]
        if self.num_classes < 0:
            bad.append(f"num_classes={self.num_classes}")
        if bad:
            raise ValueError(
                f"model sizes must be positive (num_classes at least 0), got {', '.join(bad)}."
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; choose one of "
                f"{tuple(REMAT_POLICIES)}."
            )
        if self.block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Unknown block_type {self.block_type!r}; choose one of {BLOCK_TYPES}."
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} does not divide input_size "
                f"{self.input_size}; use a patch size that divides it."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )

    def check_inputs(self, x, t, y):
        """Shape checks always; value checks (label range) on concrete arrays."""
        s, c = self.input_size, self.in_channels
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"x must be a 4-D NHWC batch [N, {s}, {s}, {c}], got shape {getattr(x, 'shape', None)}."
            )
        if tuple(x.shape[1:]) != (s, s, c):
            hint = " (it looks NCHW; transpose to NHWC)" if tuple(x.shape[1:]) == (c, s, s) else ""
            raise ValueError(f"x must be NHWC [N, {s}, {s}, {c}], got {tuple(x.shape)}{hint}.")
        n = x.shape[0]
        for arr, what in ((t, "t"), (y, "y")):
            if getattr(arr, "shape", None) != (n,):
                raise ValueError(
                    f"{what} must have shape [{n}] to match x, got {getattr(arr, 'shape', None)}."
                )
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"labels y must be integers, got dtype {y.dtype}.")
        if not isinstance(y, jax.core.Tracer):
            y_np = np.asarray(y)
            top = self.num_classes if self.class_dropout_prob > 0 else self.num_classes - 1
            if y_np.size and (y_np.min() < 0 or y_np.max() > top):
                raise ValueError(
                    f"labels must lie in [0, {top}] ({self.num_classes} classes"
                    + (f", {self.num_classes} = null class" if top == self.num_classes else "")
                    + f"), got values in [{y_np.min()}, {y_np.max()}]."
                )

    @nn.compact
    def __call__(
        self,
        x: Array,
        t: Array,
        y: Array,
        train: bool = False,
        force_drop_ids: Optional[Array] = None,
    ) -> Array:
        self.check_config()
        self.check_inputs(x, t, y)
        p, d = self.patch_size, self.hidden_size
        grid = self.input_size // p

        # Patch embedding: non-overlapping p x p patches -> Linear(p*p*C, D).
        patches = einops.rearrange(x, "n (h p) (w q) c -> n (h w) (p q c)", p=p, q=p)
        tokens = dense(d, (None, "embed"), dtype=self.dtype, name="x_embedder")(
            patches.astype(self.dtype)
        )
        pos_embed = self.param(
            "pos_embed",
            nn.with_logical_partitioning(
                lambda *_: jnp.asarray(sincos_2d(d, grid), jnp.float32)[None], (None, None, "embed")
            ),
            (1, grid * grid, d),
        )
        tokens = tokens + jax.lax.stop_gradient(pos_embed).astype(self.dtype)

        t_emb = TimestepEmbedder(
            d, dtype=self.dtype, freq_shift=self.timestep_freq_shift, name="t_embedder"
        )(t)
        y_emb = LabelEmbedder(self.num_classes, d, self.class_dropout_prob, name="y_embedder")(
            y, train, force_drop_ids
        ).astype(self.dtype)
        c = t_emb + y_emb
        cond = jnp.stack([t_emb, y_emb], axis=1)  # [N, 2, D] conditioning tokens

        if self.block_type == "in_context":
            tokens = jnp.concatenate([cond, tokens], axis=1)
        block_cls = DiTBlock
        if self.remat:
            # prevent_cse only matters outside a scan (where it costs speed, as jax documents)
            block_cls = nn.remat(
                DiTBlock,
                policy=REMAT_POLICIES[self.remat_policy],
                prevent_cse=not self.scan_blocks,
            )
        block_args = (
            d,
            self.num_heads,
            self.mlp_ratio,
            self.block_type,
            self.dtype,
            self.attention,
            self.mlp_norm_eps,
        )
        if self.scan_blocks:
            scan = nn.scan(
                lambda block, carry, c, cond: (block(carry, c, cond), None),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            tokens, _ = scan(block_cls(*block_args, name="blocks"), tokens, c, cond)
        else:
            for i in range(self.depth):
                tokens = block_cls(*block_args, name=f"blocks_{i}")(tokens, c, cond)
        if self.block_type == "in_context":
            tokens = tokens[:, 2:]

        out = FinalLayer(d, p, self.out_channels, self.block_type, self.dtype, name="final_layer")(
            tokens, c
        )
        out = einops.rearrange(out, "n (h w) (p q c) -> n (h p) (w q) c", h=grid, p=p, q=p)
        return out.astype(jnp.float32)

    def forward_with_cfg(
        self, x: Array, t: Array, y: Array, cfg_scale: float, guidance_channels: Optional[int] = 3
    ) -> Array:
        """Classifier-free guidance in one batched forward (the official batch layout).

        x: [2B, H, W, C] whose first half is used for both passes; y: [2B] = (labels, null).
        Returns [2B, H, W, C_out] with the guided epsilon in both halves (see
        `classifier_free_guidance` for which channels are guided).
        """
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        return classifier_free_guidance(out, cfg_scale, self.in_channels, guidance_channels)


def classifier_free_guidance(
    out: Array, cfg_scale: float, in_channels: int, guidance_channels: Optional[int] = 3
) -> Array:
    """The guidance mix eps = u + s * (c - u) of a doubled batch's output.

    out: [2B, H, W, C_out], the conditional half first, then the null-label half. Returns
    [2B, H, W, C_out] with the guided epsilon in both halves. guidance_channels=3 is the official
    DiT behaviour: the first three latent channels are guided and the fourth keeps each half's
    own prediction (kept for reproducing the reference FID 2.27); None guides all `in_channels`
    (the standard formulation). Never more than the model's `in_channels` epsilon channels are
    guided: the learned-variance channels pass through from each half's own forward.
    """
    g = in_channels if guidance_channels is None else min(guidance_channels, in_channels)
    eps, rest = out[..., :g], out[..., g:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------


def dummy_inputs(model: DiT, batch: int = 1):
    x = jnp.zeros((batch, model.input_size, model.input_size, model.in_channels), jnp.float32)
    return x, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32)


def init_params(model: DiT, rng: Array) -> dict:
    """Plain (unboxed) float32 parameters of `model`."""
    variables = jax.jit(model.init)({"params": rng}, *dummy_inputs(model))
    return nn.meta.unbox(variables["params"])


def abstract_params(model: DiT) -> dict:
    """Parameter shapes/dtypes (jax.ShapeDtypeStruct) without allocating anything."""
    shapes = jax.eval_shape(
        lambda r: model.init({"params": r}, *dummy_inputs(model)), jax.random.key(0)
    )
    return nn.meta.unbox(shapes["params"])


def block_layout(params) -> Optional[bool]:
    """Whether a parameter tree (or its metadata) has scanned blocks ('blocks', True), looped
    ones ('blocks_0' ..., False), or neither (None)."""
    if "blocks" in params:
        return True
    return False if "blocks_0" in params else None


def params_in_layout(params: dict, model: DiT) -> dict:
    """`params` (either layout) in `model`'s block layout: blocks_0 .. blocks_{depth-1} for a
    looped model, one 'blocks' tree with a leading [depth] axis for `scan_blocks`. The other
    entries (embedders, final layer, pos_embed) are the same in both. numpy stays numpy;
    jax arrays (and tracers) are stacked by jax."""
    looped = sorted((k for k in params if re.fullmatch(r"blocks_\d+", k)), key=lambda k: int(k[7:]))
    if model.scan_blocks and looped:
        rest = {k: v for k, v in params.items() if k not in looped}

        def stack(*leaves):
            on_host = all(isinstance(x, np.ndarray) for x in leaves)
            return np.stack(leaves) if on_host else jnp.stack(leaves)

        return {**rest, "blocks": jax.tree_util.tree_map(stack, *[params[k] for k in looped])}
    if not model.scan_blocks and "blocks" in params:
        rest = {k: v for k, v in params.items() if k != "blocks"}
        depth = jax.tree_util.tree_leaves(params["blocks"])[0].shape[0]
        for i in range(depth):
            rest[f"blocks_{i}"] = jax.tree_util.tree_map(lambda x: x[i], params["blocks"])
        return rest
    return params


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def trainable_mask(params) -> dict:
    """Pytree of bools: False for the fixed position embedding, True elsewhere."""
    return {
        k: (jax.tree_util.tree_map(lambda _: True, v) if k != "pos_embed" else False)
        for k, v in params.items()
    }
