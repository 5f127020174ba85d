"""OWL layerwise sparsity: outlier ratios and the allocation built from them."""

from __future__ import annotations

import pytest
import torch

from workbench.pruning.owl import outlier_ratio, owl_sparsities

RATIOS = [3.1, 7.4, 0.9, 5.5, 2.2, 9.8, 4.0]


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.1), (0.3, 0.02)])
def test_allocation_mean_is_target(target, lam):
    sp = owl_sparsities(RATIOS, target, lam)
    assert len(sp) == len(RATIOS)
    assert sum(sp) / len(sp) == pytest.approx(target, abs=1e-12)


def test_more_outliers_means_lower_sparsity():
    sp = owl_sparsities(RATIOS, 0.5, 0.08)
    by_ratio = sorted(range(len(RATIOS)), key=lambda i: RATIOS[i])
    by_sparsity = sorted(range(len(sp)), key=lambda i: sp[i], reverse=True)
    assert by_ratio == by_sparsity
    assert sp[RATIOS.index(max(RATIOS))] == min(sp)


@pytest.mark.parametrize("lam", [0.02, 0.08, 0.15])
def test_range_is_two_lambda(lam):
    sp = owl_sparsities(RATIOS, 0.5, lam)
    assert max(sp) - min(sp) == pytest.approx(2 * lam, abs=1e-12)


def test_values_follow_the_min_max_formula():
    # Two layers: ratios scale to 0 and 2*lam, the mean keep ratio is 1 - target.
    assert owl_sparsities([1.0, 3.0], 0.5, 0.1) == pytest.approx([0.6, 0.4])
    assert owl_sparsities([2.0, 4.0, 3.0], 0.6, 0.05) == pytest.approx([0.65, 0.55, 0.6])


def test_equal_ratios_give_uniform_target():
    assert owl_sparsities([4.2] * 5, 0.55, 0.08) == [0.55] * 5
    assert owl_sparsities([1.0, 2.0], 0.55, 0.0) == [0.55, 0.55]
    assert owl_sparsities([7.0], 0.5) == [0.5]


def test_out_of_range_sparsity_raises_and_names_the_layer():
    with pytest.raises(ValueError, match=r"layer 2 .*smaller lambda or target"):
        owl_sparsities([5.0, 5.0, 1.0], 0.95, 0.08)  # layer 2 would get 1.0567
    with pytest.raises(ValueError, match=r"layer 1"):
        owl_sparsities([1.0, 9.0], 0.05, 0.08)  # layer 1 would go below 0
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            owl_sparsities(bad, 0.5)
    for target in (1.0, -0.1):
        with pytest.raises(ValueError):
            owl_sparsities(RATIOS, target)
    with pytest.raises(ValueError):
        owl_sparsities(RATIOS, 0.5, lam=-0.01)


def test_outlier_ratio_is_a_direct_count():
    g = torch.Generator().manual_seed(0)
    # Heavy-tailed scores, as Wanda scores are, split over layers of different shapes.
    scores = [torch.randn(*shape, generator=g).abs() ** 3 for shape in [(16, 32), (48, 32), (32, 80)]]
    flat = [float(v) for s in scores for v in s.flatten().tolist()]
    mean = sum(flat) / len(flat)
    for m in (2.0, 5.0, 7.0):
        expected = 100.0 * sum(1 for v in flat if v > m * mean) / len(flat)
        got = outlier_ratio(scores, m=m)
        assert 0.0 < got < 100.0
        assert got == pytest.approx(expected, abs=1e-9)


def test_outlier_ratio_pools_layers_before_the_mean():
    # A layer's entries are outliers relative to the pooled mean, not its own mean.
    small = torch.ones(90)
    big = torch.full((10,), 20.0)
    # pooled mean = (90 + 200) / 100 = 2.9; 20 > 5 * 2.9, 1 is not
    assert outlier_ratio([small, big], m=5.0) == pytest.approx(10.0)
    assert outlier_ratio([big], m=5.0) == 0.0


def test_outlier_ratio_bad_arguments():
    with pytest.raises(ValueError):
        outlier_ratio([])
    with pytest.raises(ValueError):
        outlier_ratio([torch.ones(3)], m=0.0)
    with pytest.raises(ValueError):
        outlier_ratio([torch.tensor([1.0, float("nan")])])
    with pytest.raises(ValueError):
        outlier_ratio([torch.empty(0)])
