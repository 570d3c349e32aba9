"""Parameter and forward-Gflops counting, derived from the model itself.

Gflops follow the paper's convention: one multiply-add counts as one flop, forward pass only,
for a single image. Matrix multiplies (`dot_general`) and convolutions are counted exactly
from the traced jaxpr of `DiT.apply`; each LayerNorm adds one op per normalised element (the
fused (x - mean) * rstd multiply-add), which is how the paper's Table 4 is reproduced. Other
elementwise work (activations, modulation, softmax, residual adds) is not counted.

Also the dense bf16 peak FLOP/s of known accelerators, for MFU. The table of the 12 models is
the `python -m dit_jax.gflops` command.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import jax

from dit_jax import models

#: Dense bf16 peak FLOP/s per device by `device_kind` prefix (vendor figures).
PEAK_FLOPS = {
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H20": 148e12,
    "NVIDIA A100": 312e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(device: jax.Device) -> Optional[float]:
    """The device's dense bf16 peak FLOP/s from `PEAK_FLOPS` (longest matching prefix), or None."""
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if device.device_kind.startswith(prefix):
            return PEAK_FLOPS[prefix]
    return None


def _sub_jaxprs(eqn) -> Iterable:
    for v in eqn.params.values():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for val in vals:
            if isinstance(val, jax.extend.core.ClosedJaxpr):
                yield val.jaxpr
            elif isinstance(val, jax.extend.core.Jaxpr):
                yield val


def _dot_general_macs(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    batch = math.prod(lhs[i] for i in lb)
    contract = math.prod(lhs[i] for i in lc)
    lhs_free = math.prod(s for i, s in enumerate(lhs) if i not in lc and i not in lb)
    rb = eqn.params["dimension_numbers"][1][1]
    rhs_free = math.prod(s for i, s in enumerate(rhs) if i not in rc and i not in rb)
    return batch * contract * lhs_free * rhs_free


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_features = kernel[dn.rhs_spec[0]]
    per_output = math.prod(kernel) // out_features  # in_features/groups * spatial
    return math.prod(out) * per_output


def jaxpr_macs(jaxpr) -> int:
    """Multiply-adds of every matmul and convolution in `jaxpr` (recursing into sub-programs)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_general_macs(eqn)
        elif name == "conv_general_dilated":
            total += _conv_macs(eqn)
        for sub in _sub_jaxprs(eqn):
            total += jaxpr_macs(sub)
    return total


def forward_flops(model: models.DiT, batch: int = 1) -> int:
    """Forward flops (multiply-adds) of `model` per `batch` images, counted from the model."""
    import flax.linen as nn

    model = model.clone(scan_blocks=False, remat=False)  # the same math, every block visible
    params = models.abstract_params(model)
    x, t, y = models.dummy_inputs(model, batch)
    norm_elements = []

    def count_norms(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, nn.LayerNorm) and context.method_name == "__call__":
            norm_elements.append(math.prod(args[0].shape))
        return out

    def forward(p):
        with nn.intercept_methods(count_norms):
            return model.apply({"params": p}, x, t, y)

    closed = jax.make_jaxpr(forward)(params)
    return jaxpr_macs(closed.jaxpr) + sum(norm_elements)


def model_stats(name: str, input_size: int = 32, **overrides) -> dict:
    model = models.create_model(name, input_size=input_size, **overrides)
    model.check_config()
    return dict(
        name=models.canonical_name(name),
        params=models.count_params(models.abstract_params(model)),
        gflops=forward_flops(model) / 1e9,
        tokens=model.num_patches,
    )


def format_table(rows) -> str:
    lines = [f"{'model':<10} {'params':>14} {'tokens':>7} {'Gflops':>9}"]
    for r in rows:
        lines.append(f"{r['name']:<10} {r['params']:>14,} {r['tokens']:>7} {r['gflops']:>9.2f}")
    return "\n".join(lines)
