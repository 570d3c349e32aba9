"""Prints parameters, tokens and forward Gflops (dit_jax.flops) of the named DiT models.

python -m dit_jax.gflops                    # the 12 models at 256x256 (32x32x4 latents)
python -m dit_jax.gflops --input_size=64    # 512x512
python -m dit_jax.gflops --model=XL/2       # one model
"""

from absl import flags

from dit_jax import cli, flops, models

_MODEL = flags.DEFINE_multi_string("model", None, "Model name(s), e.g. XL/2; default: all 12.")
_INPUT_SIZE = flags.DEFINE_integer(
    "input_size", 32, "Latent side (image side / 8): 32 for 256x256."
)
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Number of classes (a null row is added).")


def main(argv):
    names = _MODEL.value or list(models.MODEL_NAMES)
    rows = [flops.model_stats(n, _INPUT_SIZE.value, num_classes=_NUM_CLASSES.value) for n in names]
    print(
        f"DiT forward cost at {_INPUT_SIZE.value * 8}x{_INPUT_SIZE.value * 8} "
        f"({_INPUT_SIZE.value}x{_INPUT_SIZE.value}x4 latents), 1 image, multiply-adds:"
    )
    print(flops.format_table(rows))


if __name__ == "__main__":
    cli.run(main)
