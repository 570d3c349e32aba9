"""Launchers for dit_jax training: Cloud TPU VMs (`launch.tpu`), one GPU node or a SLURM
cluster (`launch.gpu`), model sweeps (`launch.sweep`), the scaling report (`launch.report`) and
the CPU toy-scale scaling study (`launch.toy_sweep`).

The launchers import nothing heavy (no JAX), so `--dry_run` answers at once with the exact
commands they would run.
"""
