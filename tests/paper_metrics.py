"""Test oracle: the calibration metrics exactly as the paper's public code computes them.

Mukhoti et al., "Calibrating Deep Neural Networks using Focal Loss" (NeurIPS 2020) publish their
code at github.com/torrvision/focal_calibration.  This module was written from a reading of
``Metrics/metrics.py`` there (snapshot HEAD 475422a6754e20d25216158a874749c33e826e21; the file
was last changed in e325917364f6f5a70bd467feac547957f362683f, "Bug fix in metrics.py", which only
fixed the ``super(_ECELoss, ...)`` names of 35efa40 so that the classes can be built at all).
None of its code is copied: the semantics are re-expressed with NumPy (torch is used only for the
softmax, so that the probabilities carry the same float32 bits as ``F.softmax`` gives the paper).

What the paper's code contains, and which function here reproduces it:

- ``ECELoss`` -> :func:`paper_ece`; ``AdaptiveECELoss`` -> :func:`paper_adaptive_ece`;
  ``ClasswiseECELoss`` -> :func:`paper_classwise_ece`.  These three ``nn.Module`` classes are what
  the paper's ``evaluate.py`` reports (ECE, AdaECE, classwise ECE, 15 bins each).
- The list-based helpers ``expected_calibration_error``, ``maximum_calibration_error``,
  ``average_calibration_error`` and ``l2_error`` -> :func:`paper_list_ece`, :func:`paper_mce`,
  :func:`paper_average_ce`, :func:`paper_rmsce`.  They bin differently from the classes (exact
  edges k/n through ``ceil(n * conf - 1)``, see :func:`paper_list_bin_index`) and are not called
  by ``evaluate.py``.  In the paper's code their default is ``num_bins=10`` (``l2_error``: 15);
  here every function defaults to 15, pass ``n_bins`` explicitly to match another default.

Common conventions of the classes, all reproduced here:

- probabilities = ``F.softmax(logits, dim=1)`` in float32; confidence = max probability;
  prediction = argmax (first index on ties, as ``torch.max`` and ``np.argmax`` both give).
- bin b holds the values v with ``lower_b < v <= upper_b``; the comparison is a float32 tensor
  against a Python float, which torch evaluates in float32 (the Python float is a "wrapped number"
  that does not promote the tensor, so the bound is rounded to float32 first: checked empirically
  with torch 2.14.1 on CPU, see ``_self_check``).  A value equal to the lowest edge is in no bin.
- bin weight = (samples in the bin) / (ALL N samples), so samples in no bin still count in N;
  ECE = sum over non-empty bins of weight * |mean confidence - accuracy|.
- the paper accumulates in float32 torch tensors; this oracle accumulates in float64, so results
  agree with the paper's to float32 rounding (~1e-6 absolute), while the bin membership of every
  sample is reproduced bit for bit.

Inputs are (N, C) logits or probabilities (NumPy arrays or torch tensors, any device) and (N,)
integer labels.  Non-float32 inputs are cast to float32 first: the paper evaluated float32 logits.
Non-finite values are not supported.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "paper_probs",
    "paper_uniform_edges",
    "paper_adaptive_edges",
    "paper_ece",
    "paper_adaptive_ece",
    "paper_classwise_ece",
    "paper_list_bin_index",
    "paper_list_ece",
    "paper_mce",
    "paper_rmsce",
    "paper_average_ce",
]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def paper_probs(x, from_logits: bool = True) -> np.ndarray:
    """(N, C) float32 probabilities: ``F.softmax(x.float(), dim=1)``, or ``x`` itself if not logits.

    A torch tensor is soft-maxed on its own device (the paper ran on CUDA; CPU and CUDA softmax
    may differ in the last bit), a NumPy array on the CPU.
    """
    # torch.tensor copies, so read-only or strided arrays are fine
    t = x.detach() if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x))
    t = t.to(torch.float32)
    if from_logits:
        t = F.softmax(t, dim=1)
    p = t.cpu().numpy()
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C) input, got shape {tuple(p.shape)}")
    return p


def _labels(labels, n: int) -> np.ndarray:
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.astype(np.int64).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{y.shape[0]} labels for {n} samples")
    return y


def _top_label(x, labels, from_logits):
    """(confidence float32, correct bool) per sample, as ``torch.max(softmaxes, 1)`` gives them."""
    p = paper_probs(x, from_logits)
    y = _labels(labels, p.shape[0])
    return p.max(axis=1), p.argmax(axis=1) == y


# ---------------------------------------------------------------------------------------------
# bin edges
# ---------------------------------------------------------------------------------------------

def paper_uniform_edges(n_bins: int = 15, fma: bool = True) -> np.ndarray:
    """The float32 values of ``torch.linspace(0, 1, n_bins + 1)`` on the CPU, as the classes use.

    The paper builds these edges in ``__init__`` as a plain attribute, so ``.cuda()`` never moves
    them: they are always CPU linspace values, read back with ``.item()`` (exact float32 values).

    ATen's CPU linspace uses step = 1f / n_bins (float32); element k below the half-way index
    (steps // 2) is ``step * k``, the others ``1 - step * (n_bins - k)``.  The compiler contracts
    the latter into a fused multiply-add in the AVX2/AVX512 kernels but not in the DEFAULT one,
    so the bits depend on the CPU capability torch dispatches to (``fma=True``: AVX2/AVX512, the
    usual x86 case; ``fma=False``: ``ATEN_CPU_CAPABILITY=default``).  For 15 bins only edge 12
    differs: 0.800000011920929 with FMA, 0.7999999523162842 without.  Neither is float32(k/15)
    for every k (e.g. edge 3 is 0.20000002, not float32(0.2)).  Emulated exactly for n_bins <
    2**24: the float64 product and difference below are exact, then rounded once to float32.
    """
    if not 1 <= n_bins < 2**24:
        raise ValueError(f"n_bins must be in [1, 2**24), got {n_bins}")
    steps = n_bins + 1
    step = np.float32(1.0) / np.float32(n_bins)
    k = np.arange(steps)
    from_start = (np.float64(step) * k).astype(np.float32)  # start (0) + step * k, one rounding
    remaining = steps - 1 - k
    if fma:
        from_end = (1.0 - np.float64(step) * remaining).astype(np.float32)  # single rounding
    else:
        from_end = np.float32(1.0) - step * remaining.astype(np.float32)  # two float32 roundings
    return np.where(k < steps // 2, from_start, from_end).astype(np.float32)


def paper_adaptive_edges(conf, n_bins: int = 15) -> np.ndarray:
    """The float64 AdaECE edges: the sorted confidences interpolated at N * j / n_bins.

    Reproduces ``np.interp(np.linspace(0, N, n_bins + 1), np.arange(N), np.sort(conf))`` with the
    confidences as the float32 array NumPy makes of the paper's CPU tensor (``conf`` is cast to
    float32 here for that reason).  Consequences worth knowing:

    - edge 0 is min(conf) and edge n_bins is max(conf) (np.interp clamps position N, which lies
      past the last sample index N - 1, to the largest value);
    - the positions run to N, not N - 1, so the bins are not equal-mass: with N = 30 and 15 bins
      the edges are sorted[0, 2, ..., 28, 29] and the bins hold 2, 2, ..., 2, 1 samples;
    - interior edges at non-integer positions fall strictly between two confidences; they only
      act after rounding to float32 (see :func:`paper_adaptive_ece`).

    The paper then passes these edges to ``np.histogram`` and keeps the ``bin_edges`` it returns,
    which are the same float64 array; np.histogram only adds a check that they do not decrease.
    """
    c = np.sort(np.asarray(conf, dtype=np.float32).reshape(-1))
    if c.size == 0:
        raise ValueError("no confidences")
    positions = np.linspace(0.0, c.size, n_bins + 1)
    edges = np.interp(positions, np.arange(c.size), c)
    if np.any(edges[1:] < edges[:-1]):  # np.histogram's ValueError in the paper's code
        raise ValueError("bins must increase monotonically")
    return edges


# ---------------------------------------------------------------------------------------------
# the (lower, upper] binning of the nn.Module classes
# ---------------------------------------------------------------------------------------------

def _bin_index(values: np.ndarray, edges32: np.ndarray) -> np.ndarray:
    """Index b with edges32[b] < v <= edges32[b + 1] for each float32 value v; -1 if none.

    Same result as testing ``v > lower and v <= upper`` bin by bin: with non-decreasing edges
    the bins are disjoint, and a bin with equal edges is empty.  The comparisons are float32.
    """
    values = np.asarray(values, dtype=np.float32)
    below = np.searchsorted(edges32, values, side="left")  # how many edges are < v
    idx = below - 1
    idx[(below == 0) | (below == edges32.size)] = -1  # v <= first edge, or v > last edge
    return idx


def _weighted_gaps(idx, conf, hit, n_bins, n_total):
    """Per-bin (count, |mean conf - mean hit|) over the samples with idx >= 0, in float64."""
    inside = idx >= 0
    b = idx[inside]
    counts = np.bincount(b, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(b, weights=conf[inside].astype(np.float64), minlength=n_bins)
    hit_sum = np.bincount(b, weights=hit[inside].astype(np.float64), minlength=n_bins)
    full = counts > 0
    gaps = np.abs(conf_sum[full] / counts[full] - hit_sum[full] / counts[full])
    return counts[full] / n_total, gaps  # weight over ALL samples, as prop_in_bin is


def _ece_from_bins(idx, conf, hit, n_bins) -> float:
    weights, gaps = _weighted_gaps(idx, conf, hit, n_bins, conf.shape[0])
    return float(np.sum(weights * gaps))


def paper_ece(x, labels, n_bins: int = 15, from_logits: bool = True, fma: bool = True) -> float:
    """``ECELoss``: top-label ECE over the float32 linspace edges, bins (lower, upper].

    confidence = max softmax probability (float32), accuracy = argmax == label; bins are
    :func:`paper_uniform_edges` (``fma`` picks the CPU-capability variant); a confidence equal
    to 0 would be in no bin (never happens: it is at least 1 / C).
    """
    conf, hit = _top_label(x, labels, from_logits)
    idx = _bin_index(conf, paper_uniform_edges(n_bins, fma))
    return _ece_from_bins(idx, conf, hit, n_bins)


def paper_adaptive_ece(x, labels, n_bins: int = 15, from_logits: bool = True) -> float:
    """``AdaptiveECELoss``: the ECE of :func:`paper_ece` over :func:`paper_adaptive_edges`.

    Membership is ``conf > lower and conf <= upper`` with the float64 edges turned into Python
    floats by ``.item()`` and compared against the float32 confidence tensor, i.e. in float32:
    each edge is rounded to the nearest float32 (verified against torch in ``_self_check``).
    The first bin is open at its lower edge min(conf), so every sample whose confidence equals
    the minimum falls in no bin; it still counts in N (the bin weights are over all N).
    """
    conf, hit = _top_label(x, labels, from_logits)
    edges32 = paper_adaptive_edges(conf, n_bins).astype(np.float32)  # torch's scalar rounding
    idx = _bin_index(conf, edges32)
    return _ece_from_bins(idx, conf, hit, n_bins)


def paper_classwise_ece(
    x, labels, n_bins: int = 15, from_logits: bool = True, fma: bool = True
) -> float:
    """``ClasswiseECELoss``: mean over classes k of the ECE of column p[:, k].

    For class k every sample's p_ik is binned with the (lower, upper] float32 linspace rule of
    :func:`paper_ece`; a bin's accuracy is the fraction of its samples labelled k, its confidence
    the mean p_ik, its weight its count over all N (so p_ik == 0 is in no bin but counts in N).
    The paper averages over ``num_classes = max(labels) + 1`` classes, not over the C columns:
    columns above the largest label present are ignored, and a label >= C is an IndexError.
    """
    p = paper_probs(x, from_logits)
    y = _labels(labels, p.shape[0])
    n_classes = int(y.max()) + 1  # the paper's int((torch.max(labels) + 1).item())
    if n_classes > p.shape[1]:
        raise IndexError(f"label {n_classes - 1} out of range for {p.shape[1]} classes")
    edges32 = paper_uniform_edges(n_bins, fma)
    per_class = []
    for k in range(n_classes):
        column = p[:, k]
        per_class.append(_ece_from_bins(_bin_index(column, edges32), column, y == k, n_bins))
    return float(np.mean(per_class))


# ---------------------------------------------------------------------------------------------
# the list-based functions (expected/maximum/average_calibration_error, l2_error)
# ---------------------------------------------------------------------------------------------

def paper_list_bin_index(conf, n_bins: int = 15) -> np.ndarray:
    """Bin of each confidence in the list-based functions: ``int(ceil(n_bins * conf - 1))``.

    The paper feeds them Python floats from ``.tolist()`` of the float32 confidences, and does
    the arithmetic in float64.  For float32 inputs and n_bins < 2**29 the product is exact, so
    bin b is exactly the real interval (b / n_bins, (b + 1) / n_bins]: unlike the classes, the
    edges are the exact rationals k / n, not float32 linspace values.  A confidence of 0 (index
    -1) makes the paper's dict lookup raise KeyError; it raises ValueError here.
    """
    c = np.asarray(conf, dtype=np.float32).astype(np.float64)
    idx = np.ceil(n_bins * c - 1.0).astype(np.int64)
    if np.any((idx < 0) | (idx >= n_bins)):
        raise ValueError("a confidence outside (0, 1] has no bin (KeyError in the paper)")
    return idx


def _list_bins(x, labels, n_bins, from_logits):
    conf, hit = _top_label(x, labels, from_logits)
    return _weighted_gaps(paper_list_bin_index(conf, n_bins), conf, hit, n_bins, conf.shape[0])


def paper_list_ece(x, labels, n_bins: int = 15, from_logits: bool = True) -> float:
    """``expected_calibration_error``: sum of (count / N) * |acc - conf| over the k/n bins."""
    weights, gaps = _list_bins(x, labels, n_bins, from_logits)
    return float(np.sum(weights * gaps))


def paper_mce(x, labels, n_bins: int = 15, from_logits: bool = True) -> float:
    """``maximum_calibration_error``: max |acc - conf| over the k/n bins.

    The paper takes the max over all bins with empty ones scored 0; as gaps are >= 0 that is
    the max over the non-empty bins.
    """
    _, gaps = _list_bins(x, labels, n_bins, from_logits)
    return float(np.max(gaps))


def paper_rmsce(x, labels, n_bins: int = 15, from_logits: bool = True) -> float:
    """``l2_error``: sqrt(sum of (count / N) * (acc - conf)**2) over the k/n bins."""
    weights, gaps = _list_bins(x, labels, n_bins, from_logits)
    return float(np.sqrt(np.sum(weights * gaps**2)))


def paper_average_ce(x, labels, n_bins: int = 15, from_logits: bool = True) -> float:
    """``average_calibration_error``: unweighted mean |acc - conf| over the non-empty k/n bins."""
    _, gaps = _list_bins(x, labels, n_bins, from_logits)
    return float(np.mean(gaps))


# ---------------------------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------------------------

def _self_check() -> None:
    rng = np.random.default_rng(0)
    n, c = 3000, 10
    logits = (rng.standard_normal((n, c)) * 2.5).astype(np.float32)
    labels = np.where(rng.random(n) < 0.7, logits.argmax(1), rng.integers(0, c, n))

    # which linspace variant this CPU's torch produces (FMA-contracted or not)
    lin = {f: all(np.array_equal(paper_uniform_edges(k, f), torch.linspace(0, 1, k + 1).numpy())
                  for k in range(1, 200)) for f in (True, False)}
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}:"
          f" linspace == paper_uniform_edges(fma=True): {lin[True]}, (fma=False): {lin[False]}")

    # float32 tensor vs Python float: torch rounds the bound to float32 (float64 would differ)
    v = np.float32(0.3)
    just_below = float(np.nextafter(np.float64(v), 0.0))
    print(f"torch.tensor(0.3f).gt(float just below it) = {torch.tensor(v).gt(just_below).item()}"
          f" (float64 comparison would give True)")

    # the oracle's AdaECE bins match torch's own float32 comparisons with .item() bounds
    conf = paper_probs(logits).max(1)
    edges = paper_adaptive_edges(conf)
    idx = _bin_index(conf, edges.astype(np.float32))
    t = torch.from_numpy(conf)
    same = all(np.array_equal((t.gt(lo.item()) & t.le(hi.item())).numpy(), idx == b)
               for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])))
    print(f"AdaECE membership identical to torch's: {same};"
          f" samples in no bin: {(idx < 0).sum()} (confidences equal to the minimum:"
          f" {(conf == conf.min()).sum()})")
    print("AdaECE bin counts:", np.bincount(idx[idx >= 0], minlength=15).tolist())

    print(f"ECE            {paper_ece(logits, labels):.6f}")
    print(f"ECE (no FMA)   {paper_ece(logits, labels, fma=False):.6f}")
    print(f"AdaECE         {paper_adaptive_ece(logits, labels):.6f}")
    print(f"classwise ECE  {paper_classwise_ece(logits, labels):.6f}")
    print(f"list ECE       {paper_list_ece(logits, labels):.6f}")
    print(f"MCE            {paper_mce(logits, labels):.6f}")
    print(f"RMSCE (l2)     {paper_rmsce(logits, labels):.6f}")
    print(f"average CE     {paper_average_ce(logits, labels):.6f}")

    # same numbers from torch tensors and from probabilities
    probs = torch.softmax(torch.from_numpy(logits), 1)
    assert paper_ece(torch.from_numpy(logits), torch.from_numpy(labels)) == \
        paper_ece(probs, labels, from_logits=False)
    # classwise averages over max(label) + 1 classes: drop classes 8 and 9 from the labels
    few = np.minimum(labels, 7)
    print(f"classwise ECE with labels <= 7 (averages over 8 of 10 columns):"
          f" {paper_classwise_ece(logits, few):.6f}")


if __name__ == "__main__":
    _self_check()
