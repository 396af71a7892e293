"""ECE, AdaECE and classwise ECE against the paper's own metric code, as re-written from its
semantics in tests/paper_metrics.py (Mukhoti et al. 2020, torrvision/focal_calibration)."""

import numpy as np
import pytest
import torch

import calibkernels as ck
import paper_metrics as pm
from test_calibration import _data

CASES = [(1000, 10, 0), (1000, 10, 1), (3000, 100, 2), (257, 3, 3), (50, 7, 4)]


@pytest.mark.parametrize("n,c,seed", CASES)
@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_is_the_papers(n, c, seed, n_bins):
    x, t = _data(n, c, dtype=torch.float32, seed=seed)
    # the paper sums in float32 (~1e-7); the bins of every sample are the same
    assert abs(ck.ece(x, t, n_bins).item() - pm.paper_ece(x, t, n_bins)) < 1e-6
    assert abs(ck.mce(x, t, n_bins).item() - pm.paper_mce(x, t, n_bins)) < 1e-6
    assert abs(ck.rmsce(x, t, n_bins).item() - pm.paper_rmsce(x, t, n_bins)) < 1e-6


@pytest.mark.parametrize("n,c,seed", CASES)
def test_classwise_ece_is_the_papers_when_every_class_occurs(n, c, seed):
    x, t = _data(n, c, dtype=torch.float32, seed=seed)
    t[:c] = torch.arange(c)  # max(target) + 1 == C: the paper then averages over all C classes
    assert abs(ck.classwise_ece(x, t).item() - pm.paper_classwise_ece(x, t)) < 1e-6


def _paper_groups_first_bin_closed(conf, hit, n_bins):
    """The paper's AdaECE groups, with the samples at the minimum (in no bin there) in bin 0."""
    edges32 = pm.paper_adaptive_edges(conf, n_bins).astype(np.float32)
    idx = pm._bin_index(conf, edges32)
    idx[(idx < 0) & (conf == edges32[0])] = 0
    assert (idx >= 0).all()
    return idx, pm._ece_from_bins(idx, conf, hit, n_bins)


@pytest.mark.parametrize("n,c,seed", CASES)
@pytest.mark.parametrize("n_bins", [5, 15])
def test_adaptive_ece_uses_the_papers_groups_counting_every_sample(n, c, seed, n_bins):
    x, t = _data(n, c, dtype=torch.float32, seed=seed)
    conf, correct = ck.calibration.per_sample(x, t)
    conf_np, hit = conf.numpy(), correct.numpy().astype(np.float64)
    _, expected = _paper_groups_first_bin_closed(conf_np, hit, n_bins)
    ours = ck.adaptive_ece(x, t, n_bins).item()
    assert abs(ours - expected) <= 1e-12 * max(1.0, abs(expected))
    # the paper's own number differs only by the minimum's samples, which it drops
    paper = pm.paper_adaptive_ece(x, t, n_bins)
    assert abs(ours - paper) <= 2.0 / n


def test_adaptive_ece_keeps_tied_confidences_in_one_group():
    # N = 7 with ties: the paper's interpolated edges, (lo, hi] bins: a tie never splits
    conf = torch.tensor([0.3, 0.5, 0.5, 0.5, 0.7, 0.9, 0.9])
    correct = torch.tensor([False, True, False, True, True, True, False])
    ours = ck.calibration.adaptive_ece_from_samples(conf, correct, 3).item()
    idx, expected = _paper_groups_first_bin_closed(conf.numpy(), correct.numpy().astype(float), 3)
    assert abs(ours - expected) < 1e-12
    for value in [0.5, 0.9]:  # every tied sample in the same group
        assert len(set(idx[conf.numpy() == np.float32(value)])) == 1


def test_adaptive_ece_counts_the_minimum_where_the_paper_drops_it():
    conf = torch.tensor([0.2, 0.2, 0.4, 0.6, 0.8, 0.9])
    correct = torch.tensor([True, True, False, True, False, True])
    ours = ck.calibration.adaptive_ece_from_samples(conf, correct, 2).item()
    # edges at ranks 0, 3, 6: 0.2, 0.6, 0.9; groups [0.2, 0.6] (closed: both minima count) and
    # (0.6, 0.9]: |3/4 - 0.35| * 4/6 + |1/2 - 0.85| * 2/6
    expected = 4 / 6 * abs(3 / 4 - 0.35) + 2 / 6 * abs(1 / 2 - 0.85)
    assert abs(ours - expected) < 1e-7
    probs = torch.cat([conf[:, None], ((1 - conf) / 9)[:, None].expand(-1, 9)], 1)  # max: conf
    labels = torch.where(correct, 0, 1)
    assert torch.equal(ck.calibration.per_sample(probs, labels)[0], conf)
    # the paper's code: both 0.2 samples fall in no bin, yet count in N
    paper = 2 / 6 * abs(1 / 2 - 0.5) + 2 / 6 * abs(1 / 2 - 0.85)
    assert abs(pm.paper_adaptive_ece(probs, labels, 2, from_logits=False) - paper) < 1e-6
