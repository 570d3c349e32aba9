"""SiT (Ma et al. 2024) on a config: the same DiT and recipe, trained with stochastic
interpolants (Linear path, velocity prediction) and sampled with the probability-flow ODE."""

from configs import default


def sit(config):
    """`config` with SiT's objective and samplers (as the reference's defaults)."""
    config.objective = "interpolant"
    config.interpolant.path = "Linear"
    config.interpolant.prediction = "velocity"
    config.interpolant.loss_weight = "none"
    config.sample.sampler = "heun"      # grids: Heun on the ODE, 50 model evaluations
    config.sample.steps = 50
    config.eval.sampler = "sde-euler"   # FID: SiT's 250-step Euler-Maruyama SDE
    config.eval.steps = 250
    return config


def get_config():
    """The paper recipe (configs/default.py, DiT-XL/2) with SiT's objective: the base config of a
    SiT sweep (`python -m launch.sweep --config=configs/sit.py ...` sets each run's model)."""
    return sit(default.get_config())
