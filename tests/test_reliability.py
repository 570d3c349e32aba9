"""Fault injection: each guarantee of docs/RELIABILITY.md, proven on tiny configs.

kill -9 at random moments (mid-checkpoint included) and SIGTERM during training, corrupted,
truncated and deleted checkpoint files, an encoder killed mid-way, non-finite losses,
untrusted checkpoint files, and bad input to every command-line tool. Training runs are real
processes on one CPU device, sharing one persistent compilation cache so restarts are cheap.
"""

import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest

from conftest import REPO
from dit_jax import checkpoints, state_dicts, train, workdir as workdir_lib
from dit_jax.data import embedded, latents
from test_train import tiny_config

SEED = 1234  # of the kill schedule
STEPS = 12
TRAIN_FLAGS = [
    "--config=configs/demo.py",
    "--config.model.depth=1",
    "--config.model.hidden_size=32",
    "--config.model.num_heads=2",
    "--config.model.patch_size=4",
    "--config.data.image_size=8",
    "--config.batch_size=8",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.keep_checkpoints=2",
    "--config.sample.every_steps=0",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.warmup_steps=0",
    "--config.ema_decay=0.9",
]
TMP_MARK = "orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "dit_jax_cache"  # the one tests/test_train.py uses


@pytest.fixture(autouse=True)
def cache_env(cache, monkeypatch):
    monkeypatch.setenv("DIT_JAX_CACHE", str(cache))


@pytest.fixture(scope="module")
def env(cache, tmp_path_factory):
    """Environment of the tools run as processes: one CPU device, a shared compilation cache."""
    return {
        **os.environ,
        "DIT_JAX_CACHE": str(cache),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "jax_compilation_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def train_cmd(workdir, steps=STEPS):
    return [
        sys.executable,
        "-m",
        "dit_jax.main",
        *TRAIN_FLAGS,
        f"--config.num_train_steps={steps}",
        f"--workdir={workdir}",
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """An uninterrupted run of the tiny config: checkpoints at steps STEPS - 2 and STEPS."""
    workdir = tmp_path_factory.mktemp("reference") / "w"
    res = subprocess.run(
        train_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return workdir


def read_checkpoint(checkpoint_dir, step=None, log=print):
    """({leaf path: array}, data state, step) through the verified restore, newest if step is None."""
    manager = checkpoints.train_checkpoint_manager(str(checkpoint_dir), read_only=True)
    try:
        if step is None:
            state, data, step = checkpoints.restore_train_state(manager, log=log)
        else:
            state, data = checkpoints.restore_checkpoint(manager, step, log=log)
    finally:
        checkpoints.close_manager(manager)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}, data, step


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    assert any("ema_params" in k for k in a) and any("['params']" in k for k in a)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def tmp_dirs(checkpoint_dir):
    try:
        return [p for p in os.listdir(checkpoint_dir) if TMP_MARK in p]
    except FileNotFoundError:
        return []


def files_of(directory):
    """{relative path: bytes} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


class Run:
    """A tool started as a process, its output going to a file that can be polled."""

    def __init__(self, cmd, env, log_path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, condition, timeout=600, poll=0.005, fail=True):
        """True once condition() holds; False if the process ended first (or at the timeout,
        unless `fail`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return bool(condition())
            time.sleep(poll)
        if fail:
            raise AssertionError(f"timed out; output so far:\n{self.output()}")
        return False

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._log.close()

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self._log.close()
        return self.proc.returncode, self.output()


# ----------------------------------------------------------------------------------------
# 1 + 2. SIGTERM and kill -9 during training
# ----------------------------------------------------------------------------------------


def test_sigterm_then_kill9_at_random_moments_resume_bit_exactly(tmp_path, env, reference):
    """SIGTERM: a checkpoint at the current step within seconds, exit 0. Then kill -9 twice
    while Orbax is writing a checkpoint and once at a seeded random moment, restarting each time:
    the run ends with params, EMA, optimizer state, RNG and data position bit-identical to
    the uninterrupted run, and the same loss at every step."""
    rng = random.Random(SEED)
    workdir = tmp_path / "w"
    ckpt_dir = workdir / "checkpoints"

    run = Run(train_cmd(workdir, steps=100_000), env, tmp_path / "sigterm.log")
    assert run.wait_for(lambda: "step 3/" in run.output()), run.output()
    run.proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    code, out = run.finish(timeout=120)
    took = time.monotonic() - start
    assert code == 0, out
    assert took < 20, f"SIGTERM to exit took {took:.1f}s"
    saved = int(re.search(r"preempted: saved step (\d+)", out).group(1))
    last_step = max(int(s) for s in re.findall(r"^step (\d+)/", out, re.M))
    assert saved == last_step >= 3  # the step it was on: no finished step is lost
    _, _, newest = read_checkpoint(ckpt_dir)
    assert newest == saved and not tmp_dirs(ckpt_dir)

    interrupted_writes = 0
    for i, how in enumerate(
        ["during a checkpoint write", "during a checkpoint write", "at a random moment"]
    ):
        stale = set(tmp_dirs(ckpt_dir))  # left by an earlier kill; removed by the next start
        new_tmp = lambda: set(tmp_dirs(ckpt_dir)) - stale
        run = Run(train_cmd(workdir), env, tmp_path / f"kill{i}.log")
        if how == "during a checkpoint write":
            hit = run.wait_for(new_tmp)
        else:  # anywhere in the process's life: start-up, restore, compile or training
            hit = run.wait_for(lambda: False, timeout=rng.uniform(0.5, 8.0), fail=False)
        if run.proc.poll() is not None:  # it finished before the kill: nothing left to interrupt
            break
        run.kill()
        if how == "during a checkpoint write" and hit and new_tmp():
            interrupted_writes += 1
    assert interrupted_writes >= 1, "no kill landed inside a checkpoint write"

    res = subprocess.run(
        train_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from step" in res.stdout
    got, got_data, got_step = read_checkpoint(ckpt_dir)
    want, want_data, want_step = read_checkpoint(reference / "checkpoints")
    assert got_step == want_step == STEPS and got_data == want_data
    assert_bit_identical(got, want)
    assert metrics(workdir) == metrics(reference)  # every step's loss, once, as if never stopped
    assert [s for s, _ in metrics(workdir)] == list(range(1, STEPS + 1))
    assert not tmp_dirs(ckpt_dir)  # the interrupted writes were cleaned up
    assert not os.path.exists(
        str(ckpt_dir) + ".unusable"
    )  # no kill left a finished-but-bad checkpoint


# ----------------------------------------------------------------------------------------
# 3. Corrupted, truncated and deleted checkpoint files
# ----------------------------------------------------------------------------------------


def largest_data_file(step_dir):
    files = [
        os.path.join(root, n)
        for root, _, names in os.walk(step_dir / "state")
        for n in names
        if os.sep + "d" + os.sep in os.path.join(root, n)
    ]
    return max(files, key=os.path.getsize)


def garble(path):  # flips 16 bytes in the middle: the file keeps its size and still parses
    raw = bytearray(open(path, "rb").read())
    mid = len(raw) // 2
    raw[mid : mid + 16] = bytes(b ^ 0x5A for b in raw[mid : mid + 16])
    open(path, "wb").write(bytes(raw))


def truncate(path):
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])


def shift_data_position(step_dir):  # valid JSON, wrong value: the data iterator would skip batches
    path = step_dir / "data" / "metadata"
    state = json.loads(path.read_text())
    key = next(k for k, v in state.items() if isinstance(v, int))
    state[key] += 8
    path.write_text(json.dumps(state))


CORRUPTIONS = {
    "garbled data file": (lambda d: garble(largest_data_file(d)), "do not match the fingerprint"),
    "truncated data file": (lambda d: truncate(largest_data_file(d)), "cannot be restored"),
    "deleted data file": (lambda d: os.remove(largest_data_file(d)), "cannot be restored"),
    "deleted array metadata": (
        lambda d: os.remove(d / "state" / "_METADATA"),
        "cannot be restored",
    ),
    "edited data position": (shift_data_position, "the data iterator state"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one_exactly(
    tmp_path, reference, corruption
):
    damage, message = CORRUPTIONS[corruption]
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", ckpt_dir)
    damage(ckpt_dir / str(STEPS))
    logs = []
    got, got_data, step = read_checkpoint(ckpt_dir, log=logs.append)
    assert step == STEPS - 2
    assert len(logs) == 1 and f"checkpoint step {STEPS} " in logs[0] and message in logs[0], logs
    assert "trying the previous one" in logs[0]
    want, want_data, _ = read_checkpoint(reference / "checkpoints", STEPS - 2)
    assert_bit_identical(got, want)  # all of the previous step, nothing of the bad one
    assert got_data == want_data


def test_training_resumes_past_a_corrupt_checkpoint_and_refuses_when_all_are_bad(
    tmp_path, env, reference
):
    """Through the CLI: the corrupt newest step is named, set aside and redone, ending bit-identical
    to the uninterrupted run. With every checkpoint bad: a one-line error, files untouched."""
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    garble(largest_data_file(workdir / "checkpoints" / str(STEPS)))
    res = subprocess.run(
        train_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(rf"checkpoint step {STEPS} in \S+ is corrupt", res.stdout), res.stdout
    assert f"resumed from step {STEPS - 2}" in res.stdout
    assert f"moved the unusable checkpoint step {STEPS}" in res.stdout
    assert len(os.listdir(str(workdir / "checkpoints") + ".unusable")) == 1
    got, _, step = read_checkpoint(workdir / "checkpoints")
    assert step == STEPS
    assert_bit_identical(got, read_checkpoint(reference / "checkpoints")[0])

    bad = tmp_path / "bad"
    shutil.copytree(reference, bad)
    garble(largest_data_file(bad / "checkpoints" / str(STEPS - 2)))
    os.remove(largest_data_file(bad / "checkpoints" / str(STEPS)))
    before = files_of(bad)
    res = subprocess.run(
        train_cmd(bad), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    error = res.stderr.strip().splitlines()[-1]
    assert (
        error.startswith("error: none of the checkpoints")
        and f"steps {STEPS - 2}, {STEPS}" in error
    )
    assert files_of(bad) == before  # not a fresh start over them


def test_readers_leave_a_running_training_alone(tmp_path, reference):
    """Sampling/evaluation read a workdir read-only: an in-flight save of a training run beside
    them is not cleaned away, nothing is written, and they get the newest verified EMA."""
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    in_flight = workdir / "checkpoints" / f"{STEPS + 2}.{TMP_MARK}-1700000000"
    (in_flight / "state").mkdir(parents=True)
    (in_flight / "state" / "partial").write_bytes(b"being written")
    before = files_of(workdir)
    _, ema, step, _ = workdir_lib.load_ema(str(workdir))
    assert step == STEPS and files_of(workdir) == before
    want = read_checkpoint(reference / "checkpoints")[0]
    got = {
        f"['ema_params']{jax.tree_util.keystr(p)}": np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(ema)[0]
    }
    assert got.keys() == {k for k in want if k.startswith("['ema_params']")}
    assert all(np.array_equal(got[k], want[k]) for k in got)


# ----------------------------------------------------------------------------------------
# 4. The encoder killed mid-way
# ----------------------------------------------------------------------------------------


def test_encoder_killed_mid_way_resumes_without_duplicates_or_gaps(tmp_path, env, cache):
    """kill -9 inside a shard, then inside another, then a full run: the same 5,000 examples as
    an uninterrupted encode (the cached 8px dataset), each once, with the same contents."""
    import tensorflow_datasets as tfds

    reference = embedded.ensure_embedded_dataset(
        str(cache / "embedded_mnist5k_8px"), image_size=8, log=lambda *_: None
    )
    out = tmp_path / "lat"
    cmd = [
        sys.executable,
        "-m",
        "dit_jax.data.encode",
        "--source=embedded",
        "--autoencoder=identity:8",
        "--image_size=8",
        "--batch_size=32",
        f"--output={out}",
    ]
    sidecars = lambda: (
        [p for p in os.listdir(out) if p.endswith(".json") and "array_record" in p]
        if out.exists()
        else []
    )
    for done in (1, 3):  # kill once shard `done` is finished, i.e. inside the next one
        run = Run(cmd, env, tmp_path / f"kill{done}.log")
        assert run.wait_for(lambda: len(sidecars()) >= done, timeout=300), run.output()
        run.kill()
        assert len(sidecars()) < 5 and not (out / latents.META_FILE).exists()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "resuming: " in res.stdout

    def examples(path):
        src = tfds.builder_from_directory(str(path)).as_data_source()["train"]
        return [src[i] for i in range(len(src))]

    got, want = examples(out), examples(reference)
    ids = [e["id"].decode() for e in got]
    assert len(got) == len(want) == 5000 and len(set(ids)) == 5000
    assert set(ids) == {e["id"].decode() for e in want}
    by_id = {e["id"].decode(): e for e in want}
    for e in got[::97]:
        ref = by_id[e["id"].decode()]
        assert e["label"] == ref["label"] and np.array_equal(e["mean"], ref["mean"])
    assert latents.read_metadata(str(out))["splits"]["train"] == {
        "num_examples": 5000,
        "num_skipped": 0,
    }
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# ----------------------------------------------------------------------------------------
# 5. Non-finite loss
# ----------------------------------------------------------------------------------------


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(
        **{
            "optimizer.learning_rate": 1e30,
            "num_train_steps": 6,
            "checkpoint_every_steps": 1,
            "keep_checkpoints": 10,
            "mesh.num_devices": 1,
            "data.image_size": 8,
            "model.patch_size": 4,
            "batch_size": 8,
        }
    )
    workdir = tmp_path / "w"
    with pytest.raises(train.TrainingError) as info:
        train.train_and_evaluate(config, str(workdir))
    message = str(info.value)
    found = re.search(r"non-finite at step (\d+).*the last good checkpoint is step (\d+)", message)
    assert found, message
    bad, good = int(found.group(1)), int(found.group(2))
    assert "learning rate" in message and "grad_clip" in message  # a hint
    manager = checkpoints.train_checkpoint_manager(str(workdir / "checkpoints"), read_only=True)
    steps = list(manager.all_steps())
    checkpoints.close_manager(manager)
    # checkpoint `good` holds the state after `good` steps, i.e. before the failing step: nothing later was written
    assert good == bad >= 1 and max(steps) == good, (steps, message)
    newest, _, step = read_checkpoint(workdir / "checkpoints")
    assert step == good and all(np.isfinite(v).all() for v in newest.values())


# ----------------------------------------------------------------------------------------
# 6. Untrusted checkpoint files
# ----------------------------------------------------------------------------------------


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _stack_global(module, name):  # protocol 4: two short strings, STACK_GLOBAL
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def _arg(text: str):
    return b"X" + len(text.encode()).to_bytes(4, "little") + text.encode()


def _call(module, name, arg: str):  # GLOBAL, one string argument in a tuple, REDUCE
    return _global(module, name) + _arg(arg) + b"\x85R"


def torch_zip(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + payload + b".")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def evil_payloads(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": (_call("posix", "system", f"touch {marker}"), "'posix.system'"),
        "os.system": (_call("os", "system", f"touch {marker}"), "'os.system'"),
        "builtins.eval": (_call("builtins", "eval", touch), "'builtins.eval'"),
        "builtins.exec": (_call("builtins", "exec", touch), "'builtins.exec'"),
        "builtins.getattr": (_call("builtins", "getattr", "x"), "'builtins.getattr'"),
        # a protocol-4 dotted name reaching through an allowed global: refused as a whole
        "dotted allowed name": (
            _stack_global("collections", "OrderedDict.__class__.__base__") + _arg(touch) + b"\x85R",
            "'collections.OrderedDict.__class__.__base__'",
        ),
        # REDUCE on allowed names with arguments they do not take: an error, never a call elsewhere
        "REDUCE on OrderedDict": (_call("collections", "OrderedDict", touch), "malformed pickle"),
        "REDUCE on the tensor rebuild": (
            _call("torch._utils", "_rebuild_tensor_v2", touch),
            "malformed pickle",
        ),
        "REDUCE on a storage type": (_call("torch", "FloatStorage", touch), "malformed pickle"),
    }


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin"])
def test_pickles_asking_for_anything_but_tensors_are_refused_without_running(tmp_path, ext):
    marker = tmp_path / "executed"
    for name, (payload, expected) in evil_payloads(marker).items():
        path = torch_zip(tmp_path / f"evil{ext}", payload)
        with pytest.raises(state_dicts.CheckpointError) as info:
            state_dicts.read_state_dict(path)
        message = str(info.value)
        assert message.startswith(str(path)) and expected in message, (name, message)
        assert not marker.exists(), name


def test_damaged_torch_and_safetensors_files_are_clear_errors(tmp_path, data_dir):
    good = (data_dir / "dit_tiny_train.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) - 100])  # the zip directory is gone
    bad_crc = tmp_path / "crc.pt"
    with (
        zipfile.ZipFile(data_dir / "dit_tiny_train.pt") as src,
        zipfile.ZipFile(bad_crc, "w") as dst,
    ):
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data)
    raw = bytearray(bad_crc.read_bytes())
    at = raw.find(b"data.pkl") + 200  # inside the stored pickle record
    raw[at] ^= 0xFF
    bad_crc.write_bytes(bytes(raw))
    for path, expected in ((cut, "not a PyTorch zip checkpoint"), (bad_crc, "corrupt")):
        with pytest.raises(
            state_dicts.CheckpointError, match=re.escape(str(path)) + ".*" + expected
        ):
            state_dicts.read_state_dict(path)

    tensors = {"a": np.arange(6, dtype=np.float32), "b": np.ones(4, np.float32)}
    base = tmp_path / "w.safetensors"
    state_dicts.write_safetensors(base, tensors)
    raw = base.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def write(name, header=header, data=data, length=None):
        blob = json.dumps(header).encode()
        path = tmp_path / name
        path.write_bytes(
            (length if length is not None else len(blob)).to_bytes(8, "little") + blob + data
        )
        return path

    overlap = {**header, "b": {**header["b"], "data_offsets": [8, 24]}}  # b starts inside a
    gap = {**header, "b": {**header["b"], "data_offsets": [28, 44]}}  # 4 bytes after a unused
    cases = {
        write("overlap.safetensors", overlap): "overlaps tensor 'a'",
        write("gap.safetensors", gap, data=data + b"\0" * 4): "leaves a gap of 4 bytes",
        write(
            "beyond.safetensors", length=2 * len(raw)
        ): "header claims",  # past the end of the file
        write("short.safetensors", data=data[:-4]): "claims bytes",
        write("tail.safetensors", data=data + b"\0" * 8): "the tensors end at byte 40",
        write("entry.safetensors", header={"a": {"dtype": "F32"}}): "malformed header entry",
    }
    not_json = tmp_path / "json.safetensors"
    not_json.write_bytes((5).to_bytes(8, "little") + b"{nope")
    cases[not_json] = "not valid JSON"
    for path, expected in cases.items():
        with pytest.raises(
            state_dicts.CheckpointError, match=re.escape(str(path)) + ".*" + expected
        ):
            state_dicts.read_state_dict(path)


# ----------------------------------------------------------------------------------------
# 7. Bad input to the command-line tools
# ----------------------------------------------------------------------------------------


def test_cli_user_errors_are_one_line_without_traceback(tmp_path, env, cache, data_dir):
    """Each a real process: exit status 1, one `error:` line on stderr naming the problem, no
    traceback. Run two at a time (each costs a few seconds of imports)."""
    embedded_8px = embedded.ensure_embedded_dataset(
        str(cache / "embedded_mnist5k_8px"), image_size=8, log=lambda *_: None
    )
    marker = tmp_path / "executed"
    evil = torch_zip(
        tmp_path / "evil.bin", _call("builtins", "eval", f"open({str(marker)!r}, 'w').close()")
    )
    train_args = ("dit_jax.main", *TRAIN_FLAGS, "--config.num_train_steps=2")
    w = f"--workdir={tmp_path / 'w'}"
    cases = [
        ((*train_args, w, "--config.model.depht=2"), "unknown config field 'depht'"),
        ((*train_args, w, "--config.batch_size=eight"), "--config.batch_size=eight"),
        (("dit_jax.main", "--config=configs/no_such.py", w), "configs/no_such.py"),
        (
            (*train_args, w, f"--config.data.dir={embedded_8px}", "--config.data.image_size=16"),
            "config.data.image_size 16 does not match the dataset (8px",
        ),
        (
            (*train_args, w, "--config.sample.every_steps=1", "--config.sample.classes=(3,10)"),
            "config.sample.classes (3, 10) must lie in [0, 9]",
        ),
        (
            (*train_args, w, "--config.model.init_checkpoint=/no/such/init.pt"),
            "/no/such/init.pt: no such file",
        ),
        (
            (
                "dit_jax.sample",
                "--model=S/8",
                "--input_size=8",
                "--num_classes=10",
                "--labels=3,eleven",
            ),
            "--labels must be integers",
        ),
        (("dit_jax.sample", "--steps=ten"), "--steps=ten"),
        (
            ("dit_jax.sample", "--model=S/8", "--input_size=8", "--checkpoint=/no/such/ckpt.pt"),
            "/no/such/ckpt.pt: no such file",
        ),
        (("dit_jax.convert", f"--input={evil}", f"--output={tmp_path / 'out'}"), "refused to load"),
        (("dit_jax.convert", f"--output={tmp_path / 'out'}"), "--input is required"),
        (("dit_jax.gflops", "--model=S/2", "--input_size=-4"), "input_size=-4"),
        (("dit_jax.gflops", "--no_such_flag"), "Unknown command line flag 'no_such_flag'"),
        (
            (
                "dit_jax.data.encode",
                "--source=embedded",
                "--autoencoder=identity:16",
                "--image_size=28",
                f"--output={tmp_path / 'enc'}",
            ),
            "pads to 16",
        ),
        (
            ("dit_jax.data.encode", "--batch_size=0", f"--output={tmp_path / 'enc'}"),
            "--batch_size must be positive",
        ),
        (
            ("dit_jax.score_digits", f"--workdir={tmp_path / 'nowhere'}"),
            "is not a training workdir",
        ),
        (("dit_jax.score_digits", "--per_class=many"), "--per_class=many"),
    ]

    def run(args):
        return subprocess.run(
            [sys.executable, "-m", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, [args for args, _ in cases]))
    failures = []
    for (args, expected), res in zip(cases, results):
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("error:")]
        if not (
            res.returncode == 1
            and "Traceback" not in res.stderr
            and len(errors) == 1
            and lines[-1] == errors[0]
            and expected in errors[0]
        ):
            failures.append(
                f"{' '.join(args)}\n  exit {res.returncode}, stderr:\n{res.stderr[-2000:]}"
            )
    assert not failures, "\n".join(failures)
    assert not marker.exists()
