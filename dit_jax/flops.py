"""Parameter and forward-Gflops counting, derived from the model itself.

Gflops follow the paper's convention: one multiply-add counts as one flop, forward pass only,
for a single image. Matrix multiplies (`dot_general`) and convolutions are counted exactly
from the traced jaxpr of `DiT.apply`; each LayerNorm adds one op per normalised element (the
fused (x - mean) * rstd multiply-add), which is how the paper's Table 4 is reproduced. Other
elementwise work (activations, modulation, softmax, residual adds) is not counted.

CLI: `python -m dit_jax.flops` prints the table for the 12 named models at 256x256 (32x32x4
latents); `--input_size 64` for 512x512, `--model XL/2` for one model.
"""

from __future__ import annotations

import math
from typing import Iterable

import jax
from absl import flags

from dit_jax import cli, models


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
    return dict(name=models.canonical_name(name), params=models.count_params(models.abstract_params(model)),
                gflops=forward_flops(model) / 1e9, tokens=model.num_patches)


def format_table(rows) -> str:
    lines = [f"{'model':<10} {'params':>14} {'tokens':>7} {'Gflops':>9}"]
    for r in rows:
        lines.append(f"{r['name']:<10} {r['params']:>14,} {r['tokens']:>7} {r['gflops']:>9.2f}")
    return "\n".join(lines)


def define_flags():
    """Defines this tool's command-line flags (only when run as a program)."""
    global _MODEL, _INPUT_SIZE, _NUM_CLASSES
    _MODEL = flags.DEFINE_multi_string("model", None, "Model name(s), e.g. XL/2; default: all 12.")
    _INPUT_SIZE = flags.DEFINE_integer("input_size", 32, "Latent side (image side / 8): 32 for 256x256.")
    _NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (a null row is added).")


def main(argv):
    names = _MODEL.value or list(models.MODEL_NAMES)
    rows = [model_stats(n, _INPUT_SIZE.value, num_classes=_NUM_CLASSES.value) for n in names]
    print(f"DiT forward cost at {_INPUT_SIZE.value * 8}x{_INPUT_SIZE.value * 8} "
          f"({_INPUT_SIZE.value}x{_INPUT_SIZE.value}x4 latents), 1 image, multiply-adds:")
    print(format_table(rows))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
