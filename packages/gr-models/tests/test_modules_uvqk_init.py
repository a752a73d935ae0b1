"""`HSTUConfig.uvqk_init_std`: the UVQK projection drawn from N(0, std^2) instead of `init_method`."""

from __future__ import annotations

import pytest
import torch

from gr_models.configs import get_hstu_config
from gr_models.modules.hstu_layer import HSTULayer


def test_uvqk_init_std_draws_the_projection_small_and_leaves_the_output_alone() -> None:
    torch.manual_seed(0)
    default = HSTULayer(get_hstu_config(64, 32, 2, 1))
    torch.manual_seed(0)
    small = HSTULayer(get_hstu_config(64, 32, 2, 1, uvqk_init_std=0.02))
    assert small.uvqk.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert default.uvqk.weight.std().item() > 0.06  # Xavier for 64 -> 256: sqrt(2 / 320) = 0.079
    assert torch.count_nonzero(small.uvqk.bias) == 0
    torch.testing.assert_close(small.output.weight, default.output.weight)
    with pytest.raises(ValueError, match="uvqk_init_std"):
        get_hstu_config(64, 32, 2, 1, uvqk_init_std=0.0)


def test_output_bias_init_uniform_draws_within_the_linear_default_bound() -> None:
    torch.manual_seed(0)
    zeros = HSTULayer(get_hstu_config(64, 25, 2, 1))
    torch.manual_seed(0)
    uniform = HSTULayer(get_hstu_config(64, 25, 2, 1, output_bias_init="uniform"))
    assert torch.count_nonzero(zeros.output.bias) == 0
    bias = uniform.output.bias.detach()
    bound = 1 / 50**0.5  # fan_in = 2 heads x 25
    assert bias.abs().max().item() <= bound
    assert bias.abs().max().item() > bound / 2  # 64 draws from U(-bound, bound): none this far out has p = 2^-64
    assert bias.std().item() == pytest.approx(bound / 3**0.5, rel=0.35)
    torch.testing.assert_close(uniform.output.weight, zeros.output.weight)
    with pytest.raises(ValueError, match="output_bias_init"):
        get_hstu_config(64, 25, 2, 1, output_bias_init="normal")
