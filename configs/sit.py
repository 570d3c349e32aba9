"""SiT (Ma et al. 2024) on a config: the same DiT and recipe, trained with stochastic
interpolants (Linear path, velocity prediction) and sampled with the probability-flow ODE."""


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
