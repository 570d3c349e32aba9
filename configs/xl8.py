"""DiT-XL/8: the paper recipe (configs/default.py) with this model."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "DiT-XL/8"
    return config
