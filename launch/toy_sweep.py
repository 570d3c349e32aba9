"""The paper's scaling claim (more Gflops -> lower FID) at toy scale on CPU: class-conditional
DiTs on the embedded MNIST 5k at 16x16 (configs/demo.py), widths x patch sizes, one training
budget for all, scored by the Frechet distance of digit-classifier features ("FD-digits").

  python -m launch.toy_sweep --root=workdir/toy_sweep --out=docs/scaling

Three resumable phases, each skipped where already done:
  1. train every run through launch.sweep (local, in sequence), keeping a checkpoint at each
     evaluation point;
  2. evaluate each kept checkpoint: sample --per_class images per digit (no guidance, DDIM),
     take the penultimate (128-d) features of the digit classifier of dit_jax.evaluation.digits,
     and compute the Frechet distance to the features of the 500 held-out real digits the
     classifier never trained on; results go to ROOT/<run>/eval.jsonl as fd_digits (and the
     classifier's accuracy on the samples as digit_accuracy);
  3. the report (launch.report) with fd_digits as the metric.

The reference floor (ROOT/fd_reference.json): the FD between 500 real training digits and the
held-out ones, i.e. what a perfect generator scores with this many samples.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from launch import common, report, sweep
from launch.common import LaunchError

METRIC = "fd_digits"


# ----------------------------------------------------------------------------------------
# Scoring checkpoints (dit_jax.evaluation.digits.DigitScorer)
# ----------------------------------------------------------------------------------------


def sample_checkpoint(
    workdir: str,
    step: int,
    per_class: int,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
):
    """(images [N, S, S, 1] in [-1, 1], labels) from the EMA weights of `workdir` at `step`, no guidance."""
    import jax
    import numpy as np
    from dit_jax import sampling

    g = sampling.generator_from_workdir(workdir, step)
    labels = np.repeat(np.arange(g.model.num_classes, dtype=np.int32), per_class)
    images = g.sample_images(
        labels,
        jax.random.PRNGKey(seed),
        sampler=sampler,
        steps=steps,
        cfg_scale=1.0,
        guidance_channels=None,
    )
    return images, labels


def evaluate_run(
    workdir: str, evaluator, per_class: int, *, sampler: str, steps: int, log=print
) -> list[dict]:
    """Scores every kept checkpoint of a run not yet in its eval.jsonl; returns the new records."""
    done = {
        int(r["step"])
        for r in report.read_jsonl(os.path.join(workdir, "eval.jsonl"))
        if METRIC in r
    }
    new = []
    for step in sweep.checkpoint_steps(workdir):
        if step in done:
            continue
        t0 = time.perf_counter()
        images, labels = sample_checkpoint(workdir, step, per_class, sampler=sampler, steps=steps)
        record = {
            "step": step,
            **evaluator.score(images, labels),
            "eval_samples": len(labels),
            "eval_sampler": f"{sampler}{steps}",
            "eval_seconds": round(time.perf_counter() - t0, 1),
        }
        with open(os.path.join(workdir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        log(
            f"{os.path.basename(workdir)} step {step}: {METRIC} {record[METRIC]:.2f}, "
            f"digit accuracy {record['digit_accuracy']:.1%} ({record['eval_seconds']} s)"
        )
        new.append(record)
    return new


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def build_parser() -> common.Parser:
    p = common.Parser(prog="python -m launch.toy_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--root", default="workdir/toy_sweep", help="sweep directory (default workdir/toy_sweep)"
    )
    p.add_argument("--out", help="report directory (default ROOT/report)")
    p.add_argument("--widths", default="32,64,128", help="hidden sizes (default 32,64,128)")
    p.add_argument(
        "--patches", default="2,4", help="patch sizes at 16x16 (default 2,4: 64 and 16 tokens)"
    )
    p.add_argument("--depth", type=int, default=4, help="transformer blocks (default 4)")
    p.add_argument(
        "--steps", type=int, default=2000, help="training steps for every run (default 2000)"
    )
    p.add_argument(
        "--evals", type=int, default=4, help="checkpoints scored per run, evenly spaced (default 4)"
    )
    p.add_argument(
        "--per_class",
        type=int,
        default=50,
        help="samples per digit for FD (default 50: 500 in all)",
    )
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--sampling_steps", type=int, default=50)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override"
    )
    p.add_argument("--only", help="comma-separated run names (e.g. w64-p4)")
    p.add_argument("--skip_train", action="store_true", help="evaluate and report what is there")
    p.add_argument("--dry_run", action="store_true", help="print the training plan only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.evals < 1 or args.steps % args.evals:
        raise LaunchError(
            f"--steps ({args.steps}) must be a positive multiple of --evals ({args.evals})."
        )
    every = args.steps // args.evals
    root = common.validate_workdir(args.root, absolute=True, what="root")
    sweep_args = [
        f"--root={root}",
        "--config=configs/demo.py",
        "--local",
        "--grid",
        f"model.hidden_size={args.widths}",
        "--grid",
        f"model.patch_size={args.patches}",
        "--set",
        f"model.depth={args.depth}",
        "--set",
        f"num_train_steps={args.steps}",
        "--set",
        f"checkpoint_every_steps={every}",
        "--set",
        f"keep_checkpoints={args.evals + 1}",
        "--set",
        "keep_every_steps=0",
        "--set",
        "log_every_steps=50",
        # one EMA grid at the end, cheap: 8 per digit, DDIM 50, the demo's guidance
        "--set",
        f"sample.every_steps={args.steps}",
        "--set",
        "sample.sampler=ddim",
        "--set",
        "sample.steps=50",
        *[a for s in args.set for a in ("--set", s)],
    ]
    if args.only:
        sweep_args.append(f"--only={args.only}")
    if args.dry_run:
        sweep_args.append("--dry_run")
    if not args.skip_train:
        rc = sweep.main(sweep_args)
        if rc or args.dry_run:
            return rc
    names = report.discover(root, [n for n in args.only.split(",")] if args.only else None)
    t0 = time.perf_counter()
    evaluator = None
    for name in names:
        if evaluator is None:
            from dit_jax.evaluation import digits

            evaluator = digits.DigitScorer(16)
            print(
                f"digit classifier: held-out accuracy {evaluator.classifier_accuracy:.1%}; FD floor (500 real "
                f"training digits vs the 500 held out): {evaluator.floor:.2f}"
            )
            with open(os.path.join(root, "fd_reference.json"), "w") as f:
                json.dump(
                    {
                        "fd_real_train_vs_held_out": evaluator.floor,
                        "classifier_held_out_accuracy": evaluator.classifier_accuracy,
                        "reference_images": 500,
                    },
                    f,
                    indent=1,
                )
        evaluate_run(
            os.path.join(root, name),
            evaluator,
            args.per_class,
            sampler=args.sampler,
            steps=args.sampling_steps,
        )
    print(f"evaluation: {time.perf_counter() - t0:.0f} s")
    result = report.build_report(
        root,
        args.out or os.path.join(root, "report"),
        metric=METRIC,
        names=names,
        title="Toy scaling on CPU: DiT widths x patch sizes on MNIST 16x16",
    )
    report.print_report(result)
    return 0


if __name__ == "__main__":
    common.main_guard(main)()
