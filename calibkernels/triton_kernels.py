"""Triton kernels with the contract of the C++ ones (CONTRACT §1).

The per-row math mirrors csrc/focal_loss_row.h line for line (names included); expm1 and log1p,
which Triton lacks, use Kahan's exact-ratio forms. Under TRITON_INTERPRET=1 they run on CPU tensors.
"""

import triton
import triton.language as tl

MAX_PIECES = 8
LN_HALF = -0.6931471805599453


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) * x / log(u) with u = exp(x) cancels the rounding of u (a few ulps).
    u = tl.exp(x)
    um1 = u - 1.0
    safe = (u != 1.0) & (um1 != -1.0)
    ratio = um1 * x / tl.log(tl.where(safe, u, 2.0))
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, ratio))


@triton.jit
def _log1p(r):
    u = 1.0 + r
    ratio = tl.log(u) * r / tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, r, ratio)


@triton.jit
def log_sum_exp_shifted(n_max, rest):
    r = (n_max - 1.0) + rest
    return tl.where(r < 0.5, _log1p(r), tl.log(1.0 + r))


@triton.jit
def _as(x, ty: tl.constexpr):
    # A float64 kernel argument (a Python float under the interpreter) in the math type.
    return (tl.zeros((), ty) + x).to(ty)


@triton.jit
def select_gamma(p_y, TABLE, N_PIECES: tl.constexpr):
    """gamma from the table [thresholds..., gammas..., default] (GammaSchedule), compared in the
    math precision; NaN for a gamma that is not a finite number >= 0 (a device-side table)."""
    ty = p_y.dtype
    gamma = tl.zeros_like(p_y) + tl.load(TABLE + 2 * N_PIECES).to(ty)
    # Walk the pieces backwards so that the first threshold above p_y wins.
    for j in tl.static_range(N_PIECES - 1, -1, -1):
        tau = tl.load(TABLE + j).to(ty)
        gamma = tl.where(p_y < tau, tl.load(TABLE + N_PIECES + j).to(ty), gamma)
    valid = (gamma >= 0.0) & (gamma <= 1e30)
    return tl.where(valid, gamma, float("nan"))


@triton.jit
def focal_terms(lp, gamma):
    """(p, q, f, G) of csrc/focal_loss_row.h: q = 1 - p, f = q^gamma log p, G = p f'(p)."""
    p = tl.exp(lp)
    q = tl.where(lp < -0.6931471805599453, 1.0 - p, -_expm1(tl.minimum(lp, 0.0)))
    qg = tl.where(gamma == 0.0, 1.0,
                  tl.where(q > 0.0, tl.exp(gamma * tl.log(tl.where(q > 0.0, q, 1.0))), 0.0))
    ratio = tl.where(q > 0.0, lp / tl.where(q > 0.0, q, 1.0), -1.0)
    p_ratio = tl.where(p > 0.0, p * ratio, 0.0)
    return p, q, qg * lp, qg * (1.0 - gamma * p_ratio)


@triton.jit
def _mass(t, WEIGHT, offs, cmask, mask, c1, b, PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr,
          math_t: tl.constexpr):
    """a_k = ((1 - eps) t_k + eps / C) w_k over a (rows, classes) tile (t_k = 0 for an index
    target: its one-hot part is added apart); t is the loaded target tile when PROB."""
    a = tl.zeros(mask.shape, math_t) + b
    if PROB:
        a += c1 * t
    if HAS_WEIGHT:
        a *= tl.load(WEIGHT + offs, mask=cmask, other=0.0).to(math_t)[None, :]
    return tl.where(mask, a, 0.0)


@triton.jit
def _grad_tile(z, a, offs, mask, y, live, fill, s, log_s, gamma, S, g_y, coef,
               DENSE: tl.constexpr, PROB: tl.constexpr):
    """The gradient phase (RowStats of csrc/focal_loss_row.h) on a tile, z = x - max: coef
    (p_k S - a_k G_k), the true class of an index target coef g_y; `fill` where the sample is
    ignored (0) or bad (NaN). Without a dense target it is one exp and one multiply per element."""
    e = tl.exp(z)
    if DENSE:
        _, _, _, G_k = focal_terms(tl.where(mask, z - log_s[:, None], 0.0), gamma[:, None])
        g = ((e / s[:, None]) * S[:, None] - a * G_k) * coef[:, None]
    else:
        g = e * (S * coef / s)[:, None]
    if not PROB:
        g = tl.where(offs[None, :] == y[:, None], (g_y * coef)[:, None], g)
    return tl.where(live[:, None], g, fill[:, None])


# The mean's divisor in this many parts, one program each; a reader sums them in a fixed order
# (a plain int for the launch grid: torch.compile's tracer takes no constexpr there).
DIVISOR_PART_COUNT = 64
N_DIVISOR_PARTS = tl.constexpr(DIVISOR_PART_COUNT)


@triton.jit
def _to_storage(v, ty: tl.constexpr):
    """v in the storage type `ty`; float64 goes to 16 bits through float32, as torch's .to()."""
    if ty != tl.float64:
        v = v.to(tl.float32)
    return v.to(ty)


@triton.jit
def _divisor(DIVISOR_PARTS, n_rows, PROB: tl.constexpr):
    """The mean's divisor in float64: N for probability targets, else the sum of the parts."""
    if PROB:
        d = tl.zeros((), tl.float64) + n_rows
    else:
        d = tl.sum(tl.load(DIVISOR_PARTS + tl.arange(0, N_DIVISOR_PARTS)), 0)
    return d


@triton.jit
def focal_loss_divisor_kernel(TARGET, WEIGHT, DIVISOR_PARTS, n_rows, n_classes, ignore_index,
                              HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """Part program_id(0) of N_DIVISOR_PARTS of the mean's divisor (class-index targets): the
    float64 sum of w_y over the kept samples of its share of the rows; NaN if a kept target is
    out of range, so that the loss and gradient are NaN, never silently wrong."""
    part = tl.program_id(0)
    n_rows = tl.zeros((), tl.int64) + n_rows  # an int32 argument near 2^31 would overflow
    share = tl.cdiv(n_rows, N_DIVISOR_PARTS)
    start = part.to(tl.int64) * share
    end = tl.minimum(start + share, n_rows)
    acc = tl.zeros((BLOCK,), tl.float64)
    for first in range(start, end, BLOCK):
        rows = first + tl.arange(0, BLOCK)
        y = tl.load(TARGET + rows, mask=rows < end, other=ignore_index)
        kept = y != ignore_index
        ok = kept & (y >= 0) & (y < n_classes)
        w_y = tl.full((BLOCK,), 1.0, tl.float64)
        if HAS_WEIGHT:
            w_y = tl.load(WEIGHT + tl.where(ok, y, 0), mask=ok, other=0.0).to(tl.float64)
        acc += tl.where(ok, w_y, tl.where(kept, float("nan"), 0.0))
    tl.store(DIVISOR_PARTS + part, tl.sum(acc, 0))


@triton.jit
def focal_loss_finish_kernel(LOSS_PARTS, n_parts, DIVISOR_PARTS, OUT, n_rows, MEAN: tl.constexpr,
                             PROB: tl.constexpr, BLOCK: tl.constexpr):
    """One program: the reduced loss, the sum of the row programs' float64 partials in one fixed
    order (deterministic), over the divisor for MEAN, in the loss's dtype."""
    acc = tl.zeros((BLOCK,), tl.float64)
    for start in range(0, n_parts, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(LOSS_PARTS + offs, mask=offs < n_parts, other=0.0)
    total = tl.sum(acc, 0)
    if MEAN:
        total = total / _divisor(DIVISOR_PARTS, n_rows, PROB)
    tl.store(OUT, _to_storage(total, OUT.dtype.element_ty))


@triton.jit
def focal_loss_forward_kernel(X, TARGET, WEIGHT, TABLE, DIVISOR_PARTS, LOSS, GRAD, STATS, n_rows,
                              n_classes, ignore_index, eps: tl.float64, N_PIECES: tl.constexpr,
                              PROB: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                              HAS_GRAD: tl.constexpr, HAS_STATS: tl.constexpr,
                              DENSE: tl.constexpr, MEAN: tl.constexpr,
                              REDUCE: tl.constexpr, MATH_T: tl.constexpr, ROWS: tl.constexpr,
                              BLOCK_C: tl.constexpr, SINGLE: tl.constexpr,
                              ROW_ALIGN: tl.constexpr):
    """ROWS rows per program. SINGLE (BLOCK_C >= C): each row is read once into registers and
    its gradient written from them; otherwise the row streams in BLOCK_C pieces, read again for
    the gradient (from L2 while the rows in flight fit in it). ROW_ALIGN: a power of two that
    divides C, so that rows of C = 1000 load in 16 bytes (the runtime only marks C % 16 == 0).
    LOSS: the per-row losses, or with REDUCE the program's float64 sum of its rows' (summed by
    focal_loss_finish_kernel). MEAN with class indices: the gradient's divisor is the sum of
    focal_loss_divisor_kernel's DIVISOR_PARTS."""
    tl.static_assert(HAS_STATS or not HAS_GRAD)  # the gradient is formed from the statistics
    math_t = MATH_T  # float32, or float64 for float64 logits
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < n_rows
    n_classes = (n_classes // ROW_ALIGN) * ROW_ALIGN  # the same C, now known to be aligned
    base = rows * n_classes  # 64-bit: N * C > 2^31 at LLM vocabularies; 32-bit inside a row
    cols = tl.arange(0, BLOCK_C)

    # Pass 1: the softmax statistics (max, how many equal it, the sum of exp over the rest).
    if SINGLE:
        cmask = cols < n_classes
        mask = in_rows[:, None] & cmask[None, :]
        x = tl.load(X + base[:, None] + cols[None, :], mask=mask, other=float("-inf"))
        x = x.to(math_t)
        m = tl.max(x, 1)
        z = x - m[:, None]
        at_max = mask & (x == m[:, None])
        n_max = tl.sum(at_max.to(math_t), 1)
        rest = tl.sum(tl.where(mask & ~at_max, tl.exp(z), 0.0), 1)
    else:
        m = tl.full((ROWS,), float("-inf"), math_t)
        n_max = tl.zeros((ROWS,), math_t)
        rest = tl.zeros((ROWS,), math_t)
        for start in range(0, n_classes, BLOCK_C):
            offs = start + cols
            mask = in_rows[:, None] & (offs < n_classes)[None, :]
            x = tl.load(X + base[:, None] + offs[None, :], mask=mask, other=float("-inf"))
            x = x.to(math_t)
            new_m = tl.maximum(m, tl.max(x, 1))
            grew = new_m > m
            rest = tl.where(grew, (rest + n_max) * tl.exp(tl.where(grew, m - new_m, 0.0)), rest)
            n_max = tl.where(grew, 0.0, n_max)
            m = new_m
            at_max = mask & (x == m[:, None])
            n_max += tl.sum(at_max.to(math_t), 1)
            rest += tl.sum(tl.where(mask & ~at_max, tl.exp(x - m[:, None]), 0.0), 1)
    s = n_max + rest
    log_s = log_sum_exp_shifted(n_max, rest)

    eps = _as(eps, math_t)
    c1 = 1.0 - eps
    b = eps / n_classes
    if PROB:
        y = tl.full((ROWS,), -1, tl.int64)
        live = in_rows
        bad = rows < 0  # never
        p_sel = tl.zeros((ROWS,), math_t)
        if SINGLE:
            t = tl.load(TARGET + base[:, None] + cols[None, :], mask=mask, other=0.0).to(math_t)
            if N_PIECES > 0:  # gamma from sum_k t_k p_k
                p_sel = tl.sum(tl.where(mask, t * tl.exp(z), 0.0), 1) / s
        elif N_PIECES > 0:
            for start in range(0, n_classes, BLOCK_C):
                offs = start + cols
                mask = in_rows[:, None] & (offs < n_classes)[None, :]
                ptrs = base[:, None] + offs[None, :]
                x = tl.load(X + ptrs, mask=mask, other=0.0).to(math_t)
                t = tl.load(TARGET + ptrs, mask=mask, other=0.0).to(math_t)
                p_sel += tl.sum(tl.where(mask, t * tl.exp(x - m[:, None]), 0.0), 1)
            p_sel = p_sel / s
        lp_y = tl.zeros((ROWS,), math_t)
    else:
        y = tl.load(TARGET + rows, mask=in_rows, other=ignore_index)
        kept = y != ignore_index
        in_range = (y >= 0) & (y < n_classes)
        bad = kept & (~in_range)
        live = kept & in_range
        y_safe = tl.where(live, y, 0)  # never read out of bounds for a bad target
        x_y = tl.load(X + base + y_safe, mask=live, other=0.0).to(math_t)
        lp_y = tl.where(live, (x_y - m) - log_s, 0.0)
        p_sel = tl.exp(lp_y)
    gamma = select_gamma(p_sel, TABLE, N_PIECES)

    w_y = tl.full((ROWS,), 1.0, math_t)
    if HAS_WEIGHT and not PROB:
        w_y = tl.load(WEIGHT + y_safe, mask=in_rows, other=0.0).to(math_t)
    p_y, q_y, f_y, G_y = focal_terms(lp_y, gamma)
    if PROB:
        loss = tl.zeros((ROWS,), math_t)
        aG_y = tl.zeros((ROWS,), math_t)
    else:
        loss = c1 * w_y * f_y  # the one-hot part of the true class
        aG_y = c1 * w_y * G_y
    S_other = tl.zeros((ROWS,), math_t)

    # Pass 2 (a dense target distribution): sum_k a_k f_k and sum_k a_k G_k (k != y).
    if DENSE:
        if SINGLE:
            if not PROB:
                t = z  # unused by _mass without PROB
            a = _mass(t, WEIGHT, cols, cmask, mask, c1, b, PROB, HAS_WEIGHT, math_t)
            _, _, f_k, G_k = focal_terms(tl.where(mask, z - log_s[:, None], 0.0), gamma[:, None])
            sum_af = tl.sum(a * f_k, 1)
            sum_aG = tl.sum(tl.where(cols[None, :] != y[:, None], a * G_k, 0.0), 1)
        else:
            sum_af = tl.zeros((ROWS,), math_t)
            sum_aG = tl.zeros((ROWS,), math_t)
            for start in range(0, n_classes, BLOCK_C):
                offs = start + cols
                cmask_k = offs < n_classes
                mask = in_rows[:, None] & cmask_k[None, :]
                ptrs = base[:, None] + offs[None, :]
                x = tl.load(X + ptrs, mask=mask, other=0.0).to(math_t)
                t_k = x
                if PROB:
                    t_k = tl.load(TARGET + ptrs, mask=mask, other=0.0).to(math_t)
                a_k = _mass(t_k, WEIGHT, offs, cmask_k, mask, c1, b, PROB, HAS_WEIGHT, math_t)
                lp = tl.where(mask, (x - m[:, None]) - log_s[:, None], 0.0)
                _, _, f_k, G_k = focal_terms(lp, gamma[:, None])
                sum_af += tl.sum(a_k * f_k, 1)
                sum_aG += tl.sum(tl.where(offs[None, :] != y[:, None], a_k * G_k, 0.0), 1)
        loss += sum_af
        S_other = sum_aG
        if not PROB:
            aG_y += b * w_y * G_y

    poisoned = m == float("inf")  # as torch: x - max is inf - inf
    loss_out = tl.where(live, -loss, 0.0)
    loss_out = tl.where(bad | (live & poisoned), float("nan"), loss_out)  # ignored: 0
    if REDUCE:  # rows past n_rows hold 0
        tl.store(LOSS + tl.program_id(0), tl.sum(loss_out.to(tl.float64), 0))
    else:  # in the loss's dtype (float64 to 16 bits through float32, as .to())
        tl.store(LOSS + rows, _to_storage(loss_out, LOSS.dtype.element_ty), mask=in_rows)

    # Pass 3: the RowStats (HAS_GRAD implies them), then the gradient, written once; the true
    # class formed in the math precision.
    if HAS_STATS:
        scale = tl.full((ROWS,), 1.0, math_t)
        if MEAN:
            scale = scale / _divisor(DIVISOR_PARTS, n_rows, PROB).to(math_t)
        scale = tl.where(live, scale, 0.0)
        S = S_other + aG_y
        g_y = p_y * S_other - q_y * aG_y
        S = tl.where(poisoned, float("nan"), S)
        g_y = tl.where(poisoned, float("nan"), g_y)
        st = STATS + rows * 7
        tl.store(st + 0, m, mask=in_rows)
        tl.store(st + 1, s, mask=in_rows)
        tl.store(st + 2, log_s, mask=in_rows)
        tl.store(st + 3, gamma, mask=in_rows)
        tl.store(st + 4, S, mask=in_rows)
        tl.store(st + 5, g_y, mask=in_rows)
        tl.store(st + 6, scale, mask=in_rows)
    if HAS_GRAD:
        fill = tl.where(bad, float("nan"), 0.0)
        if SINGLE:
            if not DENSE:
                a = z  # unused by _grad_tile without DENSE
            g = _grad_tile(z, a, cols, mask, y, live, fill, s, log_s, gamma, S, g_y, scale,
                           DENSE, PROB)
            tl.store(GRAD + base[:, None] + cols[None, :], g.to(GRAD.dtype.element_ty),
                     mask=mask)
        else:
            _grad_rows(X, TARGET, WEIGHT, GRAD, base, in_rows, n_classes, y, live, fill, m, s,
                       log_s, gamma, S, g_y, scale, c1, b, DENSE, PROB, HAS_WEIGHT, math_t,
                       BLOCK_C)


@triton.jit
def _grad_rows(X, TARGET, WEIGHT, GRAD, base, in_rows, n_classes, y, live, fill, m, s, log_s,
               gamma, S, g_y, coef, c1, b, DENSE: tl.constexpr, PROB: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, math_t: tl.constexpr, BLOCK_C: tl.constexpr):
    """The gradient phase streamed over the rows in BLOCK_C pieces."""
    cols = tl.arange(0, BLOCK_C)
    for start in range(0, n_classes, BLOCK_C):
        offs = start + cols
        cmask = offs < n_classes
        mask = in_rows[:, None] & cmask[None, :]
        ptrs = base[:, None] + offs[None, :]
        z = tl.load(X + ptrs, mask=mask, other=0.0).to(math_t) - m[:, None]
        a = z
        if DENSE:
            t = z
            if PROB:
                t = tl.load(TARGET + ptrs, mask=mask, other=0.0).to(math_t)
            a = _mass(t, WEIGHT, offs, cmask, mask, c1, b, PROB, HAS_WEIGHT, math_t)
        g = _grad_tile(z, a, offs, mask, y, live, fill, s, log_s, gamma, S, g_y, coef, DENSE,
                       PROB)
        tl.store(GRAD + ptrs, g.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def focal_loss_backward_kernel(X, TARGET, WEIGHT, STATS, GRAD_OUTPUT, GRAD, n_rows, n_classes,
                               ignore_index, go_stride, eps: tl.float64, GO_PER_ROW: tl.constexpr,
                               SKIP_ONE: tl.constexpr, PROB: tl.constexpr,
                               HAS_WEIGHT: tl.constexpr, DENSE: tl.constexpr,
                               MATH_T: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
                               ROW_ALIGN: tl.constexpr):
    """The gradient phase from the forward's RowStats, ROWS rows per program. SKIP_ONE: GRAD
    holds the forward's gradient, which is the answer where grad_output is 1: those rows are not
    touched, and a program with no other row exits at once (read on the device: no host sync).
    GRAD_OUTPUT is read in its own dtype and stride (an expanded one too): no copy before."""
    math_t = MATH_T
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < n_rows
    if GO_PER_ROW:
        go = tl.load(GRAD_OUTPUT + rows * go_stride, mask=in_rows, other=1.0).to(math_t)
        if SKIP_ONE:
            in_rows = in_rows & (go != 1.0)
            if tl.max(in_rows.to(tl.int32), 0) == 0:
                return
    else:
        go_all = tl.load(GRAD_OUTPUT).to(math_t)
        if SKIP_ONE:
            if go_all == 1.0:
                return
        go = tl.zeros((ROWS,), math_t) + go_all
    st = STATS + rows * 7
    scale = tl.load(st + 6, mask=in_rows, other=0.0)
    if PROB:
        y = tl.full((ROWS,), -1, tl.int64)
        live = in_rows
        bad = rows < 0  # never
    else:
        y = tl.load(TARGET + rows, mask=in_rows, other=ignore_index)
        kept = y != ignore_index
        bad = kept & ((y < 0) | (y >= n_classes))
        live = kept & ~bad
    eps = _as(eps, math_t)
    fill = tl.where(bad, float("nan"), 0.0)
    n_classes = (n_classes // ROW_ALIGN) * ROW_ALIGN  # the same C, now known to be aligned
    _grad_rows(X, TARGET, WEIGHT, GRAD, rows * n_classes, in_rows, n_classes, y, live, fill,
               tl.load(st + 0, mask=in_rows, other=0.0), tl.load(st + 1, mask=in_rows, other=1.0),
               tl.load(st + 2, mask=in_rows, other=0.0), tl.load(st + 3, mask=in_rows, other=0.0),
               tl.load(st + 4, mask=in_rows, other=0.0), tl.load(st + 5, mask=in_rows, other=0.0),
               go * scale, 1.0 - eps, eps / n_classes, DENSE, PROB, HAS_WEIGHT, math_t, BLOCK_C)


# ---- calibration (CONTRACT §2) ----

@triton.jit
def bin_index(c, BETA, N_BINS: tl.constexpr):
    """#{j in 1..n_bins-1 : beta_j < c} (csrc/calibration_row.h): a guess from c * n_bins, then
    two steps each way against the float32 boundaries (the guess is never off by more)."""
    g = (c * N_BINS).to(tl.int32)
    g = tl.minimum(tl.maximum(g, 0), N_BINS - 1)
    g = tl.where(c == c, g, 0)  # NaN: a poisoned sample
    for _ in tl.static_range(2):
        down = (g > 0) & (tl.load(BETA + g).to(c.dtype) >= c)
        g = tl.where(down, g - 1, g)
    for _ in tl.static_range(2):
        up = (g < N_BINS - 1) & (tl.load(BETA + tl.minimum(g + 1, N_BINS)).to(c.dtype) < c)
        g = tl.where(up, g + 1, g)
    return g


# Per-sample values of calibration_rows_kernel, columns of its SAMPLES output: the softmax
# reading (confidence, Brier, NLL), the probability reading (the same three), the row's max and
# sum of exp(x - max).
CONF_L, BRIER_L, NLL_L, CONF_P, BRIER_P, NLL_P, ROW_MAX, ROW_SUM, N_SAMPLE_COLS = range(9)  # 8 columns


@triton.jit
def calibration_rows_kernel(X, TARGET, SAMPLES, CORRECT, INSIDE, TICKET, n_rows, n_classes,
                            ignore_index, MATH_T: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_C: tl.constexpr, ROW_ALIGN: tl.constexpr):
    """ROWS rows: each one's prediction (torch.argmax's lowest index on ties), both readings of
    it (csrc/cpu/calibration_cpu.cpp's softmax_sample and probability_sample: sums that leave out
    the true class, so that nothing cancels as p_y -> 1), and whether its values lie in [0, 1].
    Program 0 zeroes calibration_top_kernel's ticket (the next launch on the stream)."""
    if tl.program_id(0) == 0:
        tl.store(TICKET, 0)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_rows = rows < n_rows
    n_classes = (n_classes // ROW_ALIGN) * ROW_ALIGN  # the same C, now known to be aligned
    base = rows * n_classes
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(TARGET + rows, mask=in_rows, other=ignore_index).to(tl.int64)
    kept = y != ignore_index
    bad = kept & ((y < 0) | (y >= n_classes))
    y_safe = tl.where(kept & ~bad, y, 0)  # never read out of bounds for a bad target
    m = tl.full((ROWS,), float("-inf"), MATH_T)
    idx = tl.zeros((ROWS,), tl.int64) + n_classes
    other = tl.zeros((ROWS,), MATH_T)   # sum over k != y of exp(x_k - m)
    other2 = tl.zeros((ROWS,), MATH_T)  # ... of exp(x_k - m)^2
    sq = tl.zeros((ROWS,), MATH_T)      # ... of x_k^2
    outside = tl.zeros((ROWS,), tl.int32)
    for start in range(0, n_classes, BLOCK_C):
        offs = start + cols
        mask = in_rows[:, None] & (offs < n_classes)[None, :]
        x = tl.load(X + base[:, None] + offs[None, :], mask=mask, other=float("-inf"))
        x = x.to(MATH_T)
        cm = tl.max(x, 1)
        cidx = tl.min(tl.where(mask & (x == cm[:, None]), offs[None, :], n_classes), 1)
        grew = cm > m
        idx = tl.where(grew, cidx.to(tl.int64), idx)  # on a tie the earlier piece keeps the lowest
        new_m = tl.maximum(m, cm)
        a = tl.where(grew & (m > float("-inf")), tl.exp(m - new_m), tl.where(grew, 0.0, 1.0))
        m = new_m
        # also while m is still -inf
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m[:, None]))
        not_y = mask & (offs[None, :] != y_safe[:, None])
        other = other * a + tl.sum(tl.where(not_y, e, 0.0), 1)
        other2 = other2 * (a * a) + tl.sum(tl.where(not_y, e * e, 0.0), 1)
        sq += tl.sum(tl.where(not_y, x * x, 0.0), 1)
        outside += tl.sum((mask & ~((x >= 0.0) & (x <= 1.0))).to(tl.int32), 1)
    x_y = tl.load(X + base + y_safe, mask=in_rows, other=0.0).to(MATH_T)
    z_y = x_y - m
    s = other + tl.exp(z_y)
    nan = float("nan")
    poison_p = bad | (outside > 0)  # a value outside [0, 1] poisons the probability reading
    out = SAMPLES + rows * 8
    tl.store(out + 0, tl.where(bad, nan, 1.0 / s), mask=in_rows)
    tl.store(out + 1, tl.where(bad, nan, (other2 + other * other) / (s * s)), mask=in_rows)
    tl.store(out + 2, tl.where(bad, nan, tl.where(z_y == 0.0, _log1p(other), tl.log(s) - z_y)),
             mask=in_rows)
    tl.store(out + 3, tl.where(poison_p, nan, m), mask=in_rows)
    tl.store(out + 4, tl.where(poison_p, nan, sq + (1.0 - x_y) * (1.0 - x_y)), mask=in_rows)
    tl.store(out + 5, tl.where(poison_p, nan, -tl.log(tl.maximum(x_y, 0.0))), mask=in_rows)
    tl.store(out + 6, m, mask=in_rows)
    tl.store(out + 7, tl.where(bad, nan, s), mask=in_rows)
    tl.store(CORRECT + rows, idx == y, mask=in_rows)  # a NaN confidence voids it, at its use
    tl.store(INSIDE + rows, ~kept | (outside == 0), mask=in_rows)


@triton.jit
def _top_partials(SAMPLES, BETA, PART_COUNTS, PART_SUMS, PART_HITS, PART_TOTALS, rows, mask, keep,
                  hit, part, column, N_BINS: tl.constexpr, NB: tl.constexpr):
    """The top-label bins, Brier and NLL sums of one chunk of rows under the reading whose first
    SAMPLES column is `column`, in float64, into partial `part`."""
    c = tl.load(SAMPLES + rows * 8 + column, mask=mask, other=0.0)
    b = bin_index(c, BETA, N_BINS)
    bins = tl.arange(0, NB)
    onehot = keep[:, None] & (b[:, None] == bins[None, :])
    out = part * N_BINS + bins
    tl.store(PART_COUNTS + out, tl.sum(onehot.to(tl.int64), 0), mask=bins < N_BINS)
    tl.store(PART_SUMS + out, tl.sum(tl.where(onehot, c.to(tl.float64)[:, None], 0.0), 0),
             mask=bins < N_BINS)
    # a NaN confidence (a NaN or +inf logit, a poisoned reading) is no hit
    hits = onehot & ((hit != 0) & (c == c))[:, None]
    tl.store(PART_HITS + out, tl.sum(hits.to(tl.int64), 0), mask=bins < N_BINS)
    brier = tl.load(SAMPLES + rows * 8 + column + 1, mask=keep, other=0.0).to(tl.float64)
    nll = tl.load(SAMPLES + rows * 8 + column + 2, mask=keep, other=0.0).to(tl.float64)
    tl.store(PART_TOTALS + part * 2, tl.sum(tl.where(keep, brier, 0.0), 0))
    tl.store(PART_TOTALS + part * 2 + 1, tl.sum(tl.where(keep, nll, 0.0), 0))


@triton.jit
def _sum_partials(PART_COUNTS, PART_SUMS, PART_HITS, PART_TOTALS, n_chunks, r,
                  READINGS: tl.constexpr, N_BINS: tl.constexpr, NB: tl.constexpr,
                  BLOCK_CH: tl.constexpr):
    """Reading r's state summed over the chunks in a fixed order (the same bits every run)."""
    bins = tl.arange(0, NB)
    counts = tl.zeros((BLOCK_CH, NB), tl.int64)
    sums = tl.zeros((BLOCK_CH, NB), tl.float64)
    hits = tl.zeros((BLOCK_CH, NB), tl.int64)
    brier = tl.zeros((BLOCK_CH,), tl.float64)
    nll = tl.zeros((BLOCK_CH,), tl.float64)
    for start in range(0, n_chunks, BLOCK_CH):
        part = (start + tl.arange(0, BLOCK_CH)) * READINGS + r
        live = start + tl.arange(0, BLOCK_CH) < n_chunks
        tile = live[:, None] & (bins < N_BINS)[None, :]
        at = part[:, None] * N_BINS + bins[None, :]
        # .cg: other programs' partials, from L2 (their release, our acquire: the ticket)
        counts += tl.load(PART_COUNTS + at, mask=tile, other=0, cache_modifier=".cg")
        sums += tl.load(PART_SUMS + at, mask=tile, other=0.0, cache_modifier=".cg")
        hits += tl.load(PART_HITS + at, mask=tile, other=0, cache_modifier=".cg")
        brier += tl.load(PART_TOTALS + part * 2, mask=live, other=0.0, cache_modifier=".cg")
        nll += tl.load(PART_TOTALS + part * 2 + 1, mask=live, other=0.0, cache_modifier=".cg")
    return (tl.sum(counts, 0), tl.sum(sums, 0), tl.sum(hits, 0), tl.sum(brier, 0),
            tl.sum(nll, 0))


@triton.jit
def calibration_top_kernel(SAMPLES, CORRECT, TARGET, INSIDE, BETA, PART_COUNTS, PART_SUMS,
                           PART_HITS, PART_TOTALS, PART_INSIDE, TICKET, COUNTS, CONF_SUMS, HITS,
                           TOTALS, n_rows, ignore_index, FIRST: tl.constexpr,
                           READINGS: tl.constexpr, N_BINS: tl.constexpr, NB: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_CH: tl.constexpr):
    """The top-label state in one launch: each program bins a chunk of rows under each reading
    (FIRST: the first reading's SAMPLES column; READINGS 2: softmax then probabilities, for
    mode -1), then the last program to take the ticket (zeroed by calibration_rows_kernel) sums
    the chunks in order, keeps the reading that holds (probabilities when every chunk's kept
    values lie in [0, 1]) and writes counts, sums, hits and TOTALS: Brier, NLL, the reading
    (1: probabilities), ECE, MCE, RMSCE (csrc/calibration_row.h's binned_errors)."""
    chunk = tl.program_id(0).to(tl.int64)  # chunks x bins may pass 2^31
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < n_rows
    keep = mask & (tl.load(TARGET + rows, mask=mask, other=ignore_index) != ignore_index)
    hit = tl.load(CORRECT + rows, mask=mask, other=0).to(tl.int64)
    for r in tl.static_range(READINGS):
        _top_partials(SAMPLES, BETA, PART_COUNTS, PART_SUMS, PART_HITS, PART_TOTALS, rows, mask,
                      keep, hit, chunk * READINGS + r, FIRST + 3 * r, N_BINS, NB)
    if READINGS == 2:
        inside = tl.load(INSIDE + rows, mask=mask, other=1).to(tl.int32)
        tl.store(PART_INSIDE + chunk, tl.min(inside, 0))
    tl.debug_barrier()  # the partials before the ticket's release
    n_chunks = tl.num_programs(0).to(tl.int64)
    if tl.atomic_add(TICKET, 1, sem="acq_rel") == n_chunks - 1:
        counts, sums, hits, brier, nll = _sum_partials(
            PART_COUNTS, PART_SUMS, PART_HITS, PART_TOTALS, n_chunks, 0, READINGS, N_BINS, NB,
            BLOCK_CH)
        probs = tl.full((), FIRST == 3, tl.int1)  # CONF_P: one reading, the probabilities
        if READINGS == 2:
            counts_p, sums_p, hits_p, brier_p, nll_p = _sum_partials(
                PART_COUNTS, PART_SUMS, PART_HITS, PART_TOTALS, n_chunks, 1, READINGS, N_BINS,
                NB, BLOCK_CH)
            all_in = tl.full((BLOCK_CH,), 1, tl.int32)
            for start in range(0, n_chunks, BLOCK_CH):
                at = start + tl.arange(0, BLOCK_CH)
                all_in = tl.minimum(all_in, tl.load(PART_INSIDE + at, mask=at < n_chunks,
                                                    other=1, cache_modifier=".cg"))
            probs = tl.min(all_in, 0) == 1
            counts = tl.where(probs, counts_p, counts)
            sums = tl.where(probs, sums_p, sums)
            hits = tl.where(probs, hits_p, hits)
            brier = tl.where(probs, brier_p, brier)
            nll = tl.where(probs, nll_p, nll)
        bins = tl.arange(0, NB)
        tl.store(COUNTS + bins, counts, mask=bins < N_BINS)
        tl.store(CONF_SUMS + bins, sums, mask=bins < N_BINS)
        tl.store(HITS + bins, hits, mask=bins < N_BINS)
        # binned_errors: ECE, MCE (NaN if a gap is NaN, as torch's amax) and RMSCE; NaN if empty
        n = tl.sum(counts, 0).to(tl.float64)
        nonempty = counts > 0
        c = tl.where(nonempty, counts, 1).to(tl.float64)
        gap = tl.abs(hits.to(tl.float64) / c - sums / c)
        w = tl.where(nonempty, counts.to(tl.float64) / n, 0.0)
        l1 = tl.sum(tl.where(nonempty, w * gap, 0.0), 0)
        l2 = tl.sum(tl.where(nonempty, w * (gap * gap), 0.0), 0)
        nan_gap = tl.sum((nonempty & (gap != gap)).to(tl.int32), 0) > 0
        mx = tl.max(tl.where(nonempty & (gap == gap), gap, float("-inf")), 0)
        mx = tl.where(nan_gap, float("nan"), mx)
        empty = n == 0.0
        tl.store(TOTALS + 0, brier)
        tl.store(TOTALS + 1, nll)
        tl.store(TOTALS + 2, probs.to(tl.float64))
        tl.store(TOTALS + 3, tl.where(empty, float("nan"), l1))
        tl.store(TOTALS + 4, tl.where(empty, float("nan"), mx))
        tl.store(TOTALS + 5, tl.where(empty, float("nan"), tl.sqrt(l2)))


@triton.jit
def calibration_classwise_partials_kernel(X, TARGET, SAMPLES, BETA, PART_COUNTS, PART_SUMS,
                                          PART_HITS, n_rows, n_classes, ignore_index,
                                          rows_per_chunk, FROM_LOGITS: tl.constexpr,
                                          MATH_T: tl.constexpr, N_BINS: tl.constexpr,
                                          NB: tl.constexpr, BLOCK_R: tl.constexpr,
                                          BLOCK_K: tl.constexpr):
    """Classwise bins of one chunk of rows and one tile of classes: p_ik = exp(x - max) / sum
    (the row's statistics from calibration_rows_kernel) or x_ik, the rows in order."""
    chunk = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < n_classes
    bins = tl.arange(0, NB)
    counts = tl.zeros((BLOCK_K, NB), tl.int64)
    sums = tl.zeros((BLOCK_K, NB), tl.float64)
    hits = tl.zeros((BLOCK_K, NB), tl.int64)
    first = chunk * rows_per_chunk
    for r0 in range(0, rows_per_chunk, BLOCK_R):
        rows = first + r0 + tl.arange(0, BLOCK_R)
        rmask = (rows < n_rows) & (r0 + tl.arange(0, BLOCK_R) < rows_per_chunk)
        y = tl.load(TARGET + rows, mask=rmask, other=ignore_index).to(tl.int64)
        keep = rmask & (y != ignore_index)
        tile = keep[:, None] & kmask[None, :]
        p = tl.load(X + rows[:, None] * n_classes + ks[None, :], mask=tile, other=0.0).to(MATH_T)
        if FROM_LOGITS:
            m = tl.load(SAMPLES + rows * 8 + 6, mask=keep, other=0.0)
            s = tl.load(SAMPLES + rows * 8 + 7, mask=keep, other=1.0)
            p = tl.exp(p - m[:, None]) / s[:, None]
        else:
            c = tl.load(SAMPLES + rows * 8 + 3, mask=keep, other=0.0)
            p = tl.where((c == c)[:, None], p, float("nan"))  # a poisoned row
        b = bin_index(p, BETA, N_BINS)
        onehot = tile[:, :, None] & (b[:, :, None] == bins[None, None, :])
        counts += tl.sum(onehot.to(tl.int64), 0)
        sums += tl.sum(tl.where(onehot, p.to(tl.float64)[:, :, None], 0.0), 0)
        is_y = (y[:, None] == ks[None, :]).to(tl.int64)
        hits += tl.sum(tl.where(onehot, is_y[:, :, None], 0), 0)
    out = chunk * n_classes * N_BINS + ks[:, None] * N_BINS + bins[None, :]
    omask = kmask[:, None] & (bins[None, :] < N_BINS)
    tl.store(PART_COUNTS + out, counts, mask=omask)
    tl.store(PART_SUMS + out, sums, mask=omask)
    tl.store(PART_HITS + out, hits, mask=omask)


# ---- the temperature sweep ----

@triton.jit
def calibration_sweep_rows_kernel(X, TARGET, TEMPS, CONF, NLL, CORRECT, n_classes, ignore_index,
                                  n_temps, MATH_T: tl.constexpr, BLOCK_T: tl.constexpr,
                                  BLOCK_C: tl.constexpr):
    """One row at BLOCK_T temperatures: sum over k != y of exp((x_k - m) / T), online in m, from
    one read of the row; confidence 1 / s_T and NLL as in calibration_sweep_cpu.cpp."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * n_classes
    ts = tl.arange(0, BLOCK_T)
    tmask = ts < n_temps
    temp = tl.load(TEMPS + ts, mask=tmask, other=1.0).to(MATH_T)
    # a T that is not finite and > 0 (passed on the device, unchecked): NaN, never a number
    inv_t = tl.where((temp > 0.0) & (temp < float("inf")), 1.0 / temp, float("nan"))
    cols = tl.arange(0, BLOCK_C)
    y = tl.load(TARGET + row).to(tl.int64)
    kept = y != ignore_index
    y_safe = tl.where(kept & (y >= 0) & (y < n_classes), y, 0)
    m = tl.full((), float("-inf"), MATH_T)
    idx = tl.full((), 0, tl.int64) + n_classes
    other = tl.zeros((BLOCK_T,), MATH_T)
    for start in range(0, n_classes, BLOCK_C):
        offs = start + cols
        mask = offs < n_classes
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(MATH_T)
        cm = tl.max(x, 0)
        cidx = tl.min(tl.where(mask & (x == cm), offs, n_classes), 0).to(tl.int64)
        grew = cm > m
        idx = tl.where(grew, cidx, idx)
        new_m = tl.maximum(m, cm)
        # from a max of -inf the sums are 0 or NaN (a NaN seen so far): kept as they are
        shift = tl.where(grew & (m > float("-inf")), m - new_m, 0.0)
        other = other * tl.exp(shift * inv_t)
        m = new_m
        z = (x - m)[None, :] * inv_t[:, None]
        e = tl.where((x == float("-inf"))[None, :], 0.0, tl.exp(z))  # also while m is -inf
        other += tl.sum(tl.where((mask & (offs != y_safe))[None, :], e, 0.0), 1)
    z_y = (tl.load(x_row + y_safe).to(MATH_T) - m) * inv_t
    s = other + tl.exp(z_y)
    out = row * n_temps + ts
    # a target out of range: NaN in both (they read column 0 and would be wrong, silently)
    valid = (y == ignore_index) | ((y >= 0) & (y < n_classes))
    tl.store(CONF + out, tl.where(valid, 1.0 / s, float("nan")), mask=tmask)
    nll = tl.where(z_y == 0.0, _log1p(other), tl.log(s) - z_y)
    tl.store(NLL + out, tl.where(valid, nll, float("nan")), mask=tmask)
    tl.store(CORRECT + row, idx == y)


@triton.jit
def calibration_sweep_partials_kernel(CONF, NLL, CORRECT, TARGET, BETA, PART_COUNTS, PART_SUMS,
                                      PART_HITS, PART_NLL, n_rows, n_temps, ignore_index,
                                      N_BINS: tl.constexpr, NB: tl.constexpr,
                                      BLOCK_R: tl.constexpr):
    """The bins and NLL sum of one chunk of rows at one temperature (program axis 1)."""
    chunk = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    rows = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = rows < n_rows
    keep = mask & (tl.load(TARGET + rows, mask=mask, other=ignore_index) != ignore_index)
    c = tl.load(CONF + rows * n_temps + k, mask=mask, other=0.0)
    hit = tl.load(CORRECT + rows, mask=mask, other=0).to(tl.int64)
    b = bin_index(c, BETA, N_BINS)
    bins = tl.arange(0, NB)
    onehot = keep[:, None] & (b[:, None] == bins[None, :])
    out = (chunk * n_temps + k) * N_BINS + bins
    tl.store(PART_COUNTS + out, tl.sum(onehot.to(tl.int64), 0), mask=bins < N_BINS)
    tl.store(PART_SUMS + out, tl.sum(tl.where(onehot, c.to(tl.float64)[:, None], 0.0), 0),
             mask=bins < N_BINS)
    hits = onehot & ((hit != 0) & (c == c))[:, None]  # a NaN confidence is never correct
    tl.store(PART_HITS + out, tl.sum(hits.to(tl.int64), 0), mask=bins < N_BINS)
    nll = tl.load(NLL + rows * n_temps + k, mask=keep, other=0.0).to(tl.float64)
    tl.store(PART_NLL + chunk * n_temps + k, tl.sum(tl.where(keep, nll, 0.0), 0))
