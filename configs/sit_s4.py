"""SiT-S/4: DiT-S/4 trained with SiT's flow matching (Linear path, velocity prediction)."""

from configs import default, sit


def get_config():
    config = sit.sit(default.get_config())
    config.model.name = "DiT-S/4"
    return config
