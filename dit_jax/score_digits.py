"""Scores a demo run's class-conditional samples with the digit classifier of
dit_jax.evaluation.digits: the accuracy on samples of each class, at each guidance scale.

  python -m dit_jax.score_digits --workdir=workdir/demo --cfg_scales=1,2,3,4 --per_class=50

The classifier is trained once (about a minute on 2 CPU cores) and cached next to the
embedded dataset; its held-out accuracy is printed so the score can be read against it.
"""

import json

from absl import flags

from dit_jax import cli, sampling
from dit_jax.evaluation import digits

_WORKDIR = flags.DEFINE_string("workdir", None, "A demo training workdir.")
_SCALES = flags.DEFINE_list("cfg_scales", ["1", "2", "3", "4"], "Guidance scales to score.")
_PER_CLASS = flags.DEFINE_integer("per_class", 50, "Samples per class.")
_SAMPLER = flags.DEFINE_enum(
    "sampler",
    None,
    list(sampling.SAMPLERS + sampling.FLOW_SAMPLERS),
    "Sampler of the run's objective (default: ddim, or heun for SiT).",
)
_STEPS = flags.DEFINE_integer("steps", 50, "Sampling steps.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the results as JSON here.")


def main(argv):
    if not _WORKDIR.value:
        raise ValueError("--workdir is required.")
    try:
        scales = [float(s) for s in _SCALES.value]
    except ValueError:
        raise ValueError(f"--cfg_scales must be numbers, got {','.join(_SCALES.value)}.") from None
    results = digits.evaluate_workdir(
        _WORKDIR.value, scales, _PER_CLASS.value, sampler=_SAMPLER.value, steps=_STEPS.value
    )
    print(
        f"step {results['step']}; classifier held-out accuracy on real digits: "
        f"{results['classifier_held_out_accuracy']:.1%}"
    )
    for scale, r in results["scales"].items():
        worst = min(r["per_class"].items(), key=lambda kv: kv[1])
        print(
            f"cfg {scale:g}: accuracy {r['accuracy']:.1%} on {_PER_CLASS.value} samples/class "
            f"(worst class {worst[0]}: {worst[1]:.0%}) per class: "
            + " ".join(f"{c}:{a:.0%}" for c, a in r["per_class"].items())
        )
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
