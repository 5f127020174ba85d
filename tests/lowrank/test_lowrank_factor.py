"""Low-rank factorizations and statistics against independent computations (tensor level, no model)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from workbench.lowrank.allocation import Target, module_type
from workbench.lowrank.factor import (
    asvd_factorization, dense_params, feature_factorization, max_saving_rank, pair_params, rank_for_energy,
    rank_for_ratio, svd_factorization,
)
from workbench.lowrank.modules import LowRankLinear
from workbench.observers import InputAbsMean, OutputCovariance as OutputStats


def _outputs(fac, rank, x):
    a, b, bias = fac.truncate(rank)
    layer = LowRankLinear.from_factors(a, b, bias, dtype=torch.float64)
    return layer(x.double())


def _correlated_outputs(samples, tokens, out_features, in_features, seed=0):
    """Inputs with a few dominant directions, a weight and a bias: outputs whose covariance has a real spectrum."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(in_features, in_features, generator=g)
    scales = torch.logspace(0, -2, in_features)
    x = torch.randn(samples, tokens, in_features, generator=g) @ (basis * scales[:, None]) + 0.3
    w = torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)
    b = torch.randn(out_features, generator=g)
    return x, w, b


@pytest.mark.parametrize("with_bias", [True, False])
def test_full_rank_factorizations_reproduce_the_layer(with_bias):
    x, w, b = _correlated_outputs(4, 16, 24, 40)
    bias = b if with_bias else None
    dense = x.double() @ w.double().t() + (b.double() if with_bias else 0)
    stats = OutputStats(24, "cpu")
    stats.update(x @ w.t() + (b if with_bias else 0))
    cov, mean = stats.result()
    absmean = InputAbsMean(40, "cpu")
    absmean.update(x)
    cases = {
        "feature": (feature_factorization(w, bias, 24, cov, mean), 24),  # Q_r Q_r^T = I at rank = out
        "svd": (svd_factorization(w, bias, 24), 24),  # rank = min(out, in)
        "asvd": (asvd_factorization(w, bias, 24, absmean.result()), 24),
    }
    for name, (fac, rank) in cases.items():
        torch.testing.assert_close(_outputs(fac, rank, x), dense, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("with_bias", [True, False])
def test_mean_correction_keeps_the_mean_output_on_the_calibration_data(with_bias):
    x, w, b = _correlated_outputs(64, 8, 48, 32)  # 64 samples: two full groups of 32, equal token counts
    bias = b if with_bias else None
    y = x.double() @ w.double().t() + (b.double() if with_bias else 0)  # the layer's own outputs
    stats = OutputStats(48, "cpu")
    stats.update(y.float())
    cov, mean = stats.result()
    compressed = _outputs(feature_factorization(w, bias, 16, cov, mean), 8, x)
    torch.testing.assert_close(compressed.reshape(-1, 48).mean(0), y.reshape(-1, 48).mean(0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(compressed, y, atol=1e-2)  # a real approximation: rank 8 of 48 loses information
    plain_svd = _outputs(svd_factorization(w, bias, 8), 8, x)  # without the correction the mean drifts
    assert not torch.allclose(plain_svd.reshape(-1, 48).mean(0), y.reshape(-1, 48).mean(0), atol=1e-2)


def test_feature_truncation_matches_the_eigenvector_formula():
    x, w, b = _correlated_outputs(8, 16, 32, 24, seed=1)
    y = x @ w.t() + b
    stats = OutputStats(32, "cpu")
    stats.update(y)
    cov, mean = stats.result()
    fac = feature_factorization(w, b, 16, cov, mean)
    values, vectors = torch.linalg.eigh(cov.double())
    for r in (8, 16):
        q = vectors[:, -r:]  # the top-r eigenvectors (eigh sorts ascending)
        p = q @ q.t()
        expected = x.double() @ (p @ w.double()).t() + p @ b.double() + (torch.eye(32, dtype=torch.float64) - p) @ mean.double()
        torch.testing.assert_close(_outputs(fac, r, x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fac.spectrum.double(), values.flip(0), rtol=1e-4, atol=1e-5)


def test_svd_and_asvd_errors_are_the_discarded_singular_values():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 24, generator=g)
    s = torch.linalg.svdvals(w.double())
    fac = svd_factorization(w, None, 24)
    for r in (8, 16):
        a, b, _ = fac.truncate(r)
        err = torch.linalg.matrix_norm(w.double() - b.double() @ a.double()) ** 2
        assert float(err) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4)  # Eckart-Young
    scale_in = torch.rand(24, generator=g) + 0.1
    asvd = asvd_factorization(w, None, 24, scale_in, alpha=0.5)
    scale = scale_in.double() ** 0.5
    s_scaled = torch.linalg.svdvals(w.double() * scale[None])
    a, b, _ = asvd.truncate(8)
    weighted = torch.linalg.matrix_norm((w.double() - b.double() @ a.double()) * scale[None]) ** 2
    assert float(weighted) == pytest.approx(float((s_scaled[8:] ** 2).sum()), rel=1e-4)


def test_pooled_statistics_equal_group_covariances_averaged():
    g = torch.Generator().manual_seed(3)
    samples = [torch.randn(5 + i % 3, 6, generator=g) * (1 + i / 20) + i / 10 for i in range(70)]  # 32 + 32 + 6
    stats = OutputStats(6, "cpu", group=32)
    for i in range(0, 70, 4):  # batches of equal-length samples, and a last short one
        for s in samples[i:i + 4]:
            stats.update(s)
    cov, mean = stats.result()
    groups = [samples[0:32], samples[32:64], samples[64:70]]
    covs = [torch.cov(torch.cat(grp).double().t(), correction=1) for grp in groups]
    means = [torch.cat(grp).double().mean(0) for grp in groups]
    torch.testing.assert_close(cov.double(), sum(covs) / 3, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), sum(means) / 3, rtol=1e-5, atol=1e-6)
    assert stats.groups == 3


def test_batched_and_sample_by_sample_statistics_agree():
    g = torch.Generator().manual_seed(4)
    batch = torch.randn(40, 7, 5, generator=g)
    one = OutputStats(5, "cpu")
    one.update(batch)
    two = OutputStats(5, "cpu")
    for sample in batch:
        two.update(sample)
    for left, right in zip(one.result(), two.result()):
        torch.testing.assert_close(left, right)


@pytest.mark.parametrize("out_features, in_features", [(256, 256), (128, 256), (768, 256), (256, 768), (11008, 4096), (40, 24), (8, 8)])
def test_ranks_are_multiples_of_8_and_never_exceed_the_saving_point(out_features, in_features):
    for dense_bias in (False, True):
        for pair_bias in ({False, dense_bias} if not dense_bias else {True}):
            target = Target(0, "self_attn.q_proj", "qk", out_features, in_features, dense_bias, pair_bias)
            dense = dense_params(out_features, in_features, dense_bias)
            for ratio in [i / 20 for i in range(1, 21)]:
                rank = target.rank_for_ratio(ratio)
                rule = math.ceil(Fraction(ratio).limit_denominator(1000) * out_features * in_features / (out_features + in_features)) // 8 * 8
                if rank:
                    assert rank % 8 == 0
                    assert rank == max(8, rule)
                    assert pair_params(out_features, in_features, rank, pair_bias) < dense
                else:  # kept dense: the rule's rank (at least 8) would not save parameters
                    assert pair_params(out_features, in_features, max(8, rule), pair_bias) >= dense
            best = max_saving_rank(out_features, in_features, dense_bias, pair_bias)
            brute = max([r for r in range(0, min(out_features, in_features) + 1, 8)
                         if r == 0 or pair_params(out_features, in_features, r, pair_bias) < dense])
            assert best == brute


def test_rank_rule_examples():
    assert rank_for_ratio(256, 256, 1.0) == 128  # 256*256/512 = 128: no saving, so a q_proj at ratio 1 stays dense
    assert Target(0, "self_attn.q_proj", "qk", 256, 256, False, True).rank_for_ratio(1.0) == 0
    assert rank_for_ratio(4096, 4096, 0.8) == 1632  # ceil(1638.4) = 1639 -> 1632
    assert rank_for_ratio(11008, 4096, 0.5) == 1488  # ceil(1492.7) = 1493 -> 1488


def test_energy_rank_is_the_smallest_rank_reaching_the_fraction():
    spectrum = torch.tensor([5.0, 3.0, 1.0] + [0.1] * 37)
    total = float(spectrum.sum())
    for fraction in (0.3, 0.5, 0.8, 0.9, 0.99, 1.0):
        brute = next(r for r in range(1, 41) if float(spectrum[:r].sum()) >= fraction * total - 1e-9)
        assert rank_for_energy(spectrum, fraction) == -(-brute // 8) * 8


def test_module_types_follow_the_papers_groups():
    assert [module_type(n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] == ["qk", "qk", None, "o", "gate", "up", "down"]
    assert [module_type(n) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] == [None, "o", "up", "down"]
    assert [module_type(n) for n in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")] == \
        [None, "o", "up", "down"]
