"""Trains a DiT: `python -m dit_jax.main --config=configs/xl2.py --workdir=/ckpt/xl2`.

Config overrides: `--config.batch_size=512 --config.model.remat=True`. Starting in a workdir that
has checkpoints resumes from the latest. Multi-host runs initialise jax.distributed from the
environment (launch.local, Cloud TPU pods, SLURM) or from --coordinator_address/--num_processes/
--process_id.
"""

from absl import flags
from ml_collections import config_flags

from dit_jax import cli, sharding, train

config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-host)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
    if _WORKDIR.value is None:
        raise ValueError("--workdir is required.")
    config = flags.FLAGS.config
    if config is None:
        raise ValueError("--config is required, e.g. --config=configs/demo.py.")
    try:
        config.seed  # ml_collections reports a config file that did not load on first use
    except OSError as e:
        raise ValueError(
            f"the config file did not load: {' '.join(str(e.__cause__ or e).split())}"
        ) from None
    sharding.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main, errors=(ValueError, OSError, train.TrainingError))
