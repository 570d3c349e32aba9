"""The demo (configs/demo.py) trained with SiT's flow matching instead of DDPM: the same DiT,
data, optimiser and budget; the EMA grids are sampled with the Heun ODE.

  python -m dit_jax.main --config=configs/sit_demo.py --workdir=workdir/sit_demo
"""

from configs import demo, sit


def get_config():
    config = sit.sit(demo.get_config())
    config.sample.steps = 50
    config.eval.sampler = "heun"
    config.eval.steps = 50
    return config
