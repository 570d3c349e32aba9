"""SiT-B/2: DiT-B/2 trained with SiT's flow matching (Linear path, velocity prediction)."""

from configs import default, sit


def get_config():
    config = sit.sit(default.get_config())
    config.model.name = "DiT-B/2"
    return config
