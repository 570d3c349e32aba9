"""Sweeps and the scaling report, on synthetic runs (no training): run names and commands,
resumability (finished runs skipped), the table's contents and the plots."""

import csv
import json
import os
import stat
import sys

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from launch import common, report, sweep


def run_cli(module, capsys, *args):
    with pytest.raises(SystemExit) as e:
        common.main_guard(module.main)(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ----------------------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------------------


def test_default_sweep_is_the_twelve_models(tmp_path, capsys):
    code, out, err = run_cli(
        sweep,
        capsys,
        f"--root={tmp_path}",
        "--local",
        "--dry_run",
        "--set",
        "num_train_steps=400000",
    )
    assert code == 0, err
    names = [r.name for r in sweep.model_runs(sweep.MODELS)]
    assert names == [
        "S-2",
        "S-4",
        "S-8",
        "B-2",
        "B-4",
        "B-8",
        "L-2",
        "L-4",
        "L-8",
        "XL-2",
        "XL-4",
        "XL-8",
    ]
    assert "12 run(s), 0 done, 12 to run" in out
    assert (
        f"-m dit_jax.main --config=configs/default.py --workdir={tmp_path}/XL-8 --config.model.name=DiT-XL/8 "
        f"--config.num_train_steps=400000"
    ) in out


def test_grid_runs_on_a_custom_base_config():
    runs = sweep.grid_runs(["model.hidden_size=64,128", "model.patch_size=2,4", "model.depth=3"])
    assert [r.name for r in runs] == ["w64-p2-d3", "w64-p4-d3", "w128-p2-d3", "w128-p4-d3"]
    assert runs[1].overrides == [
        "--config.model.hidden_size=64",
        "--config.model.patch_size=4",
        "--config.model.depth=3",
    ]


def fake_finished(workdir, steps, target=None, marker=False):
    for s in steps:
        os.makedirs(os.path.join(workdir, "checkpoints", str(s)), exist_ok=True)
    if target is not None:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump({"num_train_steps": target}, f)
    if marker:
        sweep.mark_done(workdir, steps[-1])


def test_resumability_states(tmp_path):
    w = str(tmp_path / "run")
    assert sweep.run_state(w, [])[0] == "new"
    fake_finished(w, [100, 200], target=300)
    assert sweep.run_state(w, []) == ("resume", {"step": 200, "target": 300})
    assert (
        sweep.run_state(w, ["--config.num_train_steps=200"])[0] == "done"
    )  # the override sets the budget
    os.makedirs(
        os.path.join(w, "checkpoints", "300.orbax-checkpoint-tmp-1")
    )  # a save in progress is not a step
    assert sweep.run_state(w, [])[0] == "resume"
    fake_finished(w, [300])
    assert sweep.run_state(w, []) == ("done", {"step": 300, "target": 300})
    assert (
        sweep.run_state(w, ["--config.num_train_steps=600"])[0] == "resume"
    )  # a larger budget goes on


def test_sweep_skips_finished_runs(tmp_path, capsys):
    root = tmp_path / "sweep"
    fake_finished(str(root / "S-2"), [1000], target=1000)
    fake_finished(str(root / "S-4"), [500], target=1000)
    fake_finished(str(root / "B-2"), [400], marker=True)
    code, out, err = run_cli(
        sweep,
        capsys,
        f"--root={root}",
        "--models=S/2,S/4,B/2,B/4",
        "--local",
        "--dry_run",
        "--set",
        "num_train_steps=1000",
    )
    assert code == 0, err
    assert "4 run(s), 1 done, 3 to run" in out
    assert (
        "S-2          done (step 1000)" in out
        and "S-4          resume from step 500 of 1000" in out
    )
    assert "--workdir=" + str(root / "S-2") not in out and "--workdir=" + str(root / "S-4") in out
    assert "B-2          resume from step 400" in out  # its marker is for a smaller budget


FAKE_TRAIN = """#!{python}
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if a.startswith("--") and "=" in a)
workdir, steps = args["workdir"], int(args.get("config.num_train_steps", 10))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log"), "a") as f:
    f.write(os.path.basename(workdir) + "\\n")
if os.path.basename(workdir) == "w8-p4":
    sys.exit(3)  # this one crashes
os.makedirs(os.path.join(workdir, "checkpoints", str(steps)), exist_ok=True)
print("trained", workdir)
"""


def test_local_sweep_runs_in_sequence_then_skips(tmp_path, capsys):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_TRAIN.format(python=sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    root = tmp_path / "toy"
    args = [
        f"--root={root}",
        "--config=configs/demo.py",
        "--local",
        f"--python={fake}",
        "--grid",
        "model.hidden_size=8,16",
        "--grid",
        "model.patch_size=4",
        "--set",
        "num_train_steps=20",
    ]
    code, out, err = run_cli(sweep, capsys, *args)
    assert code == 1 and "run w8-p4 failed" in err
    code, out, err = run_cli(sweep, capsys, *args, "--keep_going")
    assert code == 1 and "1 run(s) failed: w8-p4" in err
    assert json.loads((root / "w16-p4" / "DONE").read_text())["step"] == 20
    assert "trained" in (root / "w16-p4" / "train.log").read_text()
    calls = (tmp_path / "calls.log").read_text().split()
    assert calls == ["w8-p4", "w8-p4", "w16-p4"]
    run_cli(sweep, capsys, *args, "--keep_going")
    assert (tmp_path / "calls.log").read_text().split() == calls + [
        "w8-p4"
    ]  # w16-p4 is done: not rerun


def test_sweep_user_errors(tmp_path, capsys):
    for args, message in (
        ([f"--root={tmp_path}", "--dry_run"], "--local"),
        (["--local"], "--root is required"),
        ([f"--root={tmp_path}", "--local", "--models=S/3"], "unknown model"),
        ([f"--root={tmp_path}", "--local", "--grid=model.depth"], "KEY=V1,V2"),
        (["--root=gs://bkt/sweep", "--launcher=tpu", "--accelerator=v4-8"], "--name is required"),
        (
            [f"--root={tmp_path}", "--launcher=tpu", "--name=t", "--accelerator=v4-64"],
            "several hosts",
        ),
    ):
        code, _, err = run_cli(sweep, capsys, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_sweep_through_launchers(capsys):
    code, out, err = run_cli(
        sweep,
        capsys,
        "--root=gs://bkt/sweep",
        "--models=S/2,B/2",
        "--launcher=slurm",
        "--nodes=2",
        "--partition=gpu",
        "--dry_run",
        "--set",
        "num_train_steps=1000",
    )
    assert code == 0, err
    assert (
        "# slurm/dit-S-2.sbatch" in out
        and "#SBATCH --job-name=dit-B-2" in out
        and "#SBATCH --nodes=2" in out
    )
    assert (
        "srun --kill-on-bad-exit=1 python -m dit_jax.main --config=configs/default.py "
        "--workdir=gs://bkt/sweep/B-2 --config.model.name=DiT-B/2 --config.num_train_steps=1000"
    ) in out
    code, out, err = run_cli(
        sweep,
        capsys,
        "--root=gs://bkt/sweep",
        "--models=L/4",
        "--launcher=tpu",
        "--name=pod",
        "--zone=z",
        "--accelerator=v4-32",
        "--dry_run",
        "--no_preflight",
    )
    assert code == 0, err
    assert "tpu-vm ssh pod --zone=z --worker=all" in out and "--workdir=gs://bkt/sweep/L-4" in out
    assert "tee -a ~/dit_jax_logs/L-4.log" in out


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------


def demo_config(width: int, patch: int) -> dict:
    sys.path.insert(0, str(REPO))
    from configs import demo

    c = demo.get_config()
    c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.patch_size = 2, width, 2, patch
    c.data.dir = "/nonexistent/dataset"  # not on this machine: the shape comes from the config
    c.data.image_size = 16
    return json.loads(c.to_json_best_effort())


def fake_run(root, name, width, patch, fd, extra_metric_file=True):
    d = root / name
    (d / "samples").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(demo_config(width, patch)))
    with open(d / "metrics.jsonl", "w") as f:
        for step in (100, 200, 300):
            f.write(
                json.dumps(
                    {"step": step, "loss": 1.0 / step * width, "mse": 0.1, "steps_per_sec": 10.0}
                )
                + "\n"
            )
        f.write('{"step": 400, "lo')  # a run still writing
    evals = [{"step": s, "fd_digits": v} for s, v in zip((100, 300), fd)]
    target = d / ("eval.jsonl" if extra_metric_file else "metrics.jsonl")
    with open(target, "a") as f:
        f.write("\n" + "\n".join(json.dumps(e) for e in evals) + "\n")
    for step in (100, 300):
        Image.fromarray(np.full((20, 20), step // 2, np.uint8)).save(
            d / "samples" / f"step_{step:08d}.png"
        )


def test_report_table_and_plots(tmp_path, capsys):
    root = tmp_path / "toy"
    fake_run(root, "w16-p4", 16, 4, (50.0, 30.0))
    fake_run(root, "w32-p4", 32, 4, (40.0, 20.0), extra_metric_file=False)
    fake_run(root, "w32-p2", 32, 2, (30.0, 10.0))
    (root / "not-a-run").mkdir()
    out = tmp_path / "report"
    code, stdout, err = run_cli(report, capsys, f"--root={root}", f"--out={out}")
    assert code == 0, err
    with open(out / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["w16-p4", "w32-p4", "w32-p2"]  # by Gflops
    g = [float(r["gflops"]) for r in rows]
    assert g[0] < g[1] < g[2]
    w32p2 = rows[2]
    assert (
        w32p2["model"] == "d2-w32-h2-p2"
        and int(w32p2["tokens"]) == 64
        and int(w32p2["batch_size"]) == 64
    )
    assert int(w32p2["patch"]) == 2
    assert int(w32p2["steps"]) == 300 and float(w32p2["final_loss"]) == pytest.approx(32 / 300)
    assert float(w32p2["train_compute_gflop"]) == pytest.approx(g[2] * 64 * 300 * 3)
    assert float(w32p2["fd_digits_final"]) == 10.0 and int(w32p2["fd_digits_best_step"]) == 300
    assert float(w32p2["train_minutes"]) == pytest.approx(300 / 10 / 60)
    assert float(rows[0]["fd_digits_final"]) == 30.0
    md = (out / "scaling.md").read_text()
    assert (
        "| w32-p2 | d2-w32-h2-p2 | 0.0845 | 0.002205 | 64 | 2 | 64 | 300 |" in md
        and "Spearman rank correlation of Gflops and final fd_digits: -1.00 (-1: fd_digits falls"
        in md
    )
    for name in (
        "loss_vs_steps",
        "fd_digits_vs_steps",
        "fd_digits_vs_gflops",
        "fd_digits_vs_compute",
        "samples",
    ):
        path = out / f"{name}.png"
        assert path.is_file() and Image.open(path).size[0] > 100, name
    assert "fd_digits_vs_gflops" in stdout


def test_report_picks_fid_and_takes_any_metric(tmp_path, capsys):
    root = tmp_path / "runs"
    fake_run(root, "a", 16, 4, (5.0, 4.0))
    with open(root / "a" / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 300, "fid": 123.0, "is": 7.5}) + "\n")
    result = report.build_report(str(root), str(tmp_path / "r1"), flops=False)
    assert result["metric"] == "fid" and result["rows"][0]["fid_final"] == 123.0
    assert result["rows"][0]["gflops"] is None and result["rows"][0]["train_compute_gflop"] is None
    result = report.build_report(str(root), str(tmp_path / "r2"), metric="is", flops=False)
    assert result["rows"][0]["is_final"] == 7.5 and "metric_vs_steps" in result["files"]


def test_report_user_errors(tmp_path, capsys):
    for args, message in (
        (["--out=x"], "--root is required"),
        ([f"--root={tmp_path / 'nope'}"], "not a directory"),
        ([f"--root={tmp_path}"], "no runs under"),
        ([f"--root={tmp_path}", "--out=gs://bkt/report"], "must be a local directory"),
    ):
        code, _, err = run_cli(report, capsys, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_spearman():
    assert report.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert report.spearman([1, 2], [2, 1]) is None


# ----------------------------------------------------------------------------------------
# Toy study: checkpoints scored once each, results in eval.jsonl
# ----------------------------------------------------------------------------------------


def test_toy_evaluation_scores_each_checkpoint_once(tmp_path, monkeypatch):
    from launch import toy_sweep

    w = tmp_path / "w32-p4"
    fake_finished(str(w), [100, 200])
    sampled = []

    def fake_sample(workdir, step, per_class, **kwargs):
        sampled.append(step)
        return np.zeros((10 * per_class, 16, 16, 1), np.float32), np.repeat(
            np.arange(10), per_class
        )

    class FakeEvaluator:
        def score(self, images, labels):
            return {"fd_digits": float(len(images)), "digit_accuracy": 0.5}

    monkeypatch.setattr(toy_sweep, "sample_checkpoint", fake_sample)
    new = toy_sweep.evaluate_run(
        str(w), FakeEvaluator(), 3, sampler="ddim", steps=5, log=lambda *_: None
    )
    assert (
        [r["step"] for r in new] == [100, 200]
        and new[0]["fd_digits"] == 30.0
        and new[0]["eval_samples"] == 30
    )
    fake_finished(str(w), [300])
    toy_sweep.evaluate_run(str(w), FakeEvaluator(), 3, sampler="ddim", steps=5, log=lambda *_: None)
    assert sampled == [100, 200, 300]
    assert [r["step"] for r in report.read_jsonl(str(w / "eval.jsonl"))] == [100, 200, 300]


def test_toy_sweep_plan(tmp_path, capsys):
    from launch import toy_sweep

    code, out, err = run_cli(
        toy_sweep, capsys, f"--root={tmp_path}", "--dry_run", "--steps=1000", "--evals=4"
    )
    assert code == 0, err
    assert "6 run(s), 0 done, 6 to run" in out
    assert (
        "--config=configs/demo.py --workdir="
        + str(tmp_path / "w128-p2")
        + " --config.model.hidden_size=128 "
        "--config.model.patch_size=2 --config.model.depth=4 --config.num_train_steps=1000 "
        "--config.checkpoint_every_steps=250 --config.keep_checkpoints=5"
    ) in out
    code, _, err = run_cli(toy_sweep, capsys, f"--root={tmp_path}", "--steps=1000", "--evals=3")
    assert code == 1 and "multiple of --evals" in err


def test_local_sweep_as_several_processes(tmp_path, capsys):
    """--local --num_processes=2 runs each model through launch.local (multi-host on one machine)."""
    code, out, err = run_cli(
        sweep,
        capsys,
        f"--root={tmp_path}",
        "--local",
        "--dry_run",
        "--models=S/8",
        "--num_processes=2",
        "--devices_per_process=4",
    )
    assert code == 0, err
    assert (
        "-m launch.local --num_processes=2 --devices_per_process=4 -- " in out
        and "-m dit_jax.main --config=configs/default.py" in out
    ), out
