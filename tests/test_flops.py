"""Parameters and Gflops counted from the model reproduce the paper's Table 4 and the official
parameter counts."""

import pytest

from dit_jax import flops, models

# Peebles & Xie 2023, Table 4: forward Gflops at 256x256.
PAPER_GFLOPS = {
    "S/8": 0.36,
    "S/4": 1.41,
    "S/2": 6.06,
    "B/8": 1.42,
    "B/4": 5.56,
    "B/2": 23.01,
    "L/8": 5.01,
    "L/4": 19.70,
    "L/2": 80.71,
    "XL/8": 7.39,
    "XL/4": 29.05,
    "XL/2": 118.64,
}
# Parameter counts of the official implementation (1000 classes + null, learned sigma, pos_embed).
OFFICIAL_PARAMS = {
    "XL/2": 675_129_632,
    "XL/4": 675_074_432,
    "L/2": 458_102_816,
    "B/2": 130_512_416,
    "S/2": 32_963_360,
    "S/8": 33_148_160,
}


@pytest.mark.parametrize("name", sorted(PAPER_GFLOPS))
def test_table4_gflops(name):
    stats = flops.model_stats(name)
    assert abs(stats["gflops"] - PAPER_GFLOPS[name]) <= 0.02, stats
    if name in OFFICIAL_PARAMS:
        assert stats["params"] == OFFICIAL_PARAMS[name]


def test_flops_scale_with_batch_and_resolution():
    model = models.create_model("S/8")
    one, four = flops.forward_flops(model, 1), flops.forward_flops(model, 4)
    assert four == 4 * one
    big = models.create_model("S/8", input_size=64)  # 512x512: 4x the tokens
    assert 3.5 * one < flops.forward_flops(big) < 4.5 * one
