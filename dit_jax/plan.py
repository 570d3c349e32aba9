"""Plan a run before paying for it: the real train step compiled ahead of time for a TPU
topology or a GPU node on this machine (no accelerator needed; libtpu from
`pip install 'jax[tpu]'`, the CUDA plugin and ptxas from the `plan-gpu` extra).

  python -m dit_jax.plan --config=configs/xl2.py --topology=v5p-8 --batch=256
  python -m dit_jax.plan --config=configs/xl2.py --topology=v5e-16 --batch=256 --search
  python -m dit_jax.plan --config=configs/xl2.py --topology=h100x8 --batch=256
  python -m dit_jax.plan --config=configs/xl2.py --topology=2xv5p-128 --json \\
      --config.model.remat=True --set mesh.fsdp=8

Per chip it prints the state's bytes (parameters, EMA, optimizer), the compiled program's
arguments, temporaries and peak against the chip's memory, flops from XLA and from the Gflops
counter, the collectives in the program, and an estimated step time as images/s per chip and
MFU (TPU: XLA's cost model; GPU: a roofline bound): an estimate, not a measurement. A program
that does not fit is reported as such (required vs available memory) with exit status 1.
`--search` compiles fsdp over every divisor of the chip count x remat (off, or on with each
policy) x looped/scanned blocks x attention (x per-chip batch when --batch is not given),
keeps what fits, ranks by estimated throughput and prints the winner as --config.* overrides.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from dit_jax import cli, planning

config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "Target, as typed: v4-8, v5p-64, v5e-16 (v5litepod-16), v6e-8, 2xv5p-128 (several slices), "
    "h100x8, h200x8, 4xh100x8 (several nodes).",
)
_BATCH = flags.DEFINE_integer(
    "batch",
    None,
    "Global batch (default: the config's batch_size; "
    "with --search and no --batch the per-chip batch is searched too).",
)
_SET = flags.DEFINE_multi_string(
    "set", [], "Config override key=value (repeatable), e.g. model.remat=True."
)
_SEARCH = flags.DEFINE_bool(
    "search",
    False,
    "Search fsdp x remat x scanned blocks x attention (x per-chip batch) for the fastest "
    "configuration that fits.",
)
_REMAT = flags.DEFINE_list(
    "remat", list(planning.REMAT_CHOICES), "With --search: remat choices (off or a policy)."
)
_SCAN = flags.DEFINE_list("scan", ["False", "True"], "With --search: model.scan_blocks values.")
_ATTENTION = flags.DEFINE_list(
    "attention", ["einsum", "xla"], "With --search: attention implementations."
)
_FSDP = flags.DEFINE_list(
    "fsdp", None, "With --search: only these fsdp sizes (default: every divisor of the chip count)."
)
_PER_CHIP_BATCH = flags.DEFINE_list(
    "per_chip_batch",
    ["8", "16", "32", "64", "128"],
    "With --search and no --batch: per-chip batches to try.",
)
_SAMPLE_BATCH = flags.DEFINE_integer(
    "sample_batch", 0, "Also compile the sampling loop (config.sample) at this global batch."
)
_SAMPLE_STEPS = flags.DEFINE_integer(
    "sample_steps", 2, "Model evaluations in the compiled sampling loop."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of text.")


def apply_sets(config, items):
    """key=value overrides (values read as Python literals, else strings)."""
    overrides = planning.parse_overrides(items)
    try:
        return planning.with_overrides(config, overrides)
    except (KeyError, AttributeError) as e:
        raise ValueError(f"--set: unknown config field {e}") from None


def main(argv):
    config = flags.FLAGS.config
    if config is None:
        raise ValueError("--config is required, e.g. --config=configs/xl2.py.")
    if not _TOPOLOGY.value:
        raise ValueError(f"--topology is required; {planning.valid_forms()}.")
    topology = planning.parse_topology(_TOPOLOGY.value)
    config = apply_sets(config, _SET.value)
    if _BATCH.value:
        config = planning.with_overrides(config, {"batch_size": _BATCH.value})
    if _SEARCH.value:
        fsdp = [int(f) for f in _FSDP.value] if _FSDP.value else None
        log = (
            None
            if _JSON.value
            else lambda p: print(
                "  "
                + " ".join(f"{k.split('.')[-1]}={p.overrides[k]}" for k in planning.SEARCH_KEYS)
                + ": "
                + (
                    f"fits, estimated {p.estimated_step_seconds * 1e3:.1f} ms/step"
                    if p.fits and p.estimated_step_seconds
                    else "fits"
                    if p.fits
                    else "does not fit"
                ),
                flush=True,
            )
        )
        best, plans = planning.search(
            config,
            topology,
            fixed_batch=bool(_BATCH.value),
            log=log,
            fsdp=fsdp,
            per_chip_batches=[int(b) for b in _PER_CHIP_BATCH.value],
            remat=_REMAT.value,
            scan=[_bool(v) for v in _SCAN.value],
            attention=_ATTENTION.value,
        )
        if best is not None and _SAMPLE_BATCH.value:
            best = planning.plan_train(
                planning.with_overrides(config, best.overrides),
                topology,
                sample_batch=_SAMPLE_BATCH.value,
                sample_steps=_SAMPLE_STEPS.value,
            )
        shown = best or plans[0]
        if _JSON.value:
            out = shown.to_json()
            out["fits"] = best is not None
            out["candidates"] = [p.to_json() for p in plans]
            print(json.dumps(out))
        else:
            print(planning.format_candidates(plans))
            if best is None:
                print(f"nothing fits on {topology.name}: every candidate runs out of HBM")
            else:
                print("\nbest plan:\n" + planning.format_plan(best))
                print("\nrun it with: " + " ".join(best.flag_overrides()))
        return 0 if best is not None else 1
    plan = planning.plan_train(
        config, topology, sample_batch=_SAMPLE_BATCH.value, sample_steps=_SAMPLE_STEPS.value
    )
    fits = plan.fits and (plan.sample is None or plan.sample["fits"])
    if _JSON.value:
        print(json.dumps({**plan.to_json(), "fits": fits}))
    else:
        print(planning.format_plan(plan))
    sys.stdout.flush()
    return 0 if fits else 1


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise ValueError(f"--scan {text!r}: expected True or False.")
    return text.lower() == "true"


def _main(argv):
    rc = main(argv)
    if rc:
        sys.stdout.flush()
        sys.exit(rc)


if __name__ == "__main__":
    cli.run(_main)
