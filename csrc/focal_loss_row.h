// Per-row focal-loss math shared by the CPU and CUDA kernels (CONTRACT §1).
// Plain C++: no torch types, so nvcc compiles it in seconds and the CPU tests
// check the very formulas the GPU runs.
#pragma once

#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_HD __host__ __device__ __forceinline__
#else
#define CK_HD inline
#endif

// The functions of the row headers are compiled once per CPU instruction set (csrc/cpu/, with
// -DCPU_CAPABILITY=...): a namespace of their own keeps the linker from merging one instruction
// set's copy into another's. Types stay outside: every translation unit shares them.
#if defined(CPU_CAPABILITY)
#define CK_CAPABILITY_BEGIN namespace CPU_CAPABILITY {
#define CK_CAPABILITY_END }
#else
#define CK_CAPABILITY_BEGIN
#define CK_CAPABILITY_END
#endif

namespace calibkernels {

// The most pieces an adaptive-gamma schedule may have (CONTRACT §1).
constexpr int kMaxGammaPieces = 8;

// gamma_i = gammas[j] for the first j with p_y < thresholds[j], else fallback. On the wire (the
// ops' `gamma` tensor) a schedule is the float64 table [thresholds..., gammas..., fallback]: a
// fixed gamma is a table of one value, and changing the values never changes a compiled graph.
struct GammaSchedule {
  int n;
  double thresholds[kMaxGammaPieces];
  double gammas[kMaxGammaPieces];
  double fallback;
};

template <typename T>
struct FocalTerms {
  T p, q, f, G;
};

// What the gradient phase needs of a row, saved by the forward (the `stats` output, one row of
// kRowStats values in the math type): d loss / d x_j = go scale (p_j S - a_j G_j) with
// p_j = exp(x_j - m) / s, a_j the target mass and G_j from (x_j - m) - log_s and gamma; the true
// class of a class-index target takes go scale g_y instead (formed without cancellation). scale
// is 1 / the mean's divisor for "mean", else 1, and 0 for an ignored sample.
template <typename T>
struct RowStats {
  T m, s, log_s, gamma, S, g_y, scale;
};
constexpr int kRowStats = 7;

CK_CAPABILITY_BEGIN

// Unpacks a table of 2n + 1 values (n <= kMaxGammaPieces; callers check the length).
CK_HD GammaSchedule schedule_from_table(const double* table, int n_values) {
  GammaSchedule s{};
  s.n = (n_values - 1) / 2;
  for (int j = 0; j < s.n; ++j) {
    s.thresholds[j] = table[j];
    s.gammas[j] = table[s.n + j];
  }
  s.fallback = table[2 * s.n];
  return s;
}

// Math in float for float/half/bfloat16 inputs, in double for double.
CK_HD float ck_exp(float x) { return expf(x); }
CK_HD double ck_exp(double x) { return exp(x); }
CK_HD float ck_expm1(float x) { return expm1f(x); }
CK_HD double ck_expm1(double x) { return expm1(x); }
CK_HD float ck_log(float x) { return logf(x); }
CK_HD double ck_log(double x) { return log(x); }
CK_HD float ck_log1p(float x) { return log1pf(x); }
CK_HD double ck_log1p(double x) { return log1p(x); }
CK_HD float ck_pow(float x, float y) { return powf(x, y); }
CK_HD double ck_pow(double x, double y) { return pow(x, y); }

// log sum_k exp(x_k - m), from the number of k with x_k == m (each adds exactly 1) and the sum
// of the rest: for a confident row the rest is tiny, and log1p keeps it where 1 + rest would not.
template <typename T>
CK_HD T log_sum_exp_shifted(T n_max, T rest) {
  const T r = (n_max - T(1)) + rest;
  return r < T(0.5) ? ck_log1p(r) : ck_log(T(1) + r);  // log is exact enough there, and faster
}

// Thresholds are compared in the math precision, so every backend agrees bit for bit. A gamma
// that is not a finite number >= 0 (only possible from a device-side table, which the host
// cannot check without a synchronisation) gives NaN: never a silently wrong loss.
template <typename T>
CK_HD T select_gamma(const GammaSchedule& s, T p_y) {
  double g = s.fallback;
  for (int j = 0; j < s.n; ++j) {
    if (p_y < static_cast<T>(s.thresholds[j])) {
      g = s.gammas[j];
      break;
    }
  }
  return g >= 0.0 && g <= 1e300 ? static_cast<T>(g) : static_cast<T>(NAN);
}

// For one class with log-probability lp and exponent gamma:
//   p = exp(lp), q = 1 - p (as -expm1(lp): exact where p -> 1, the regime focal loss is for),
//   f = q^gamma * log p        (the loss term, before the factor -t_k w_k)
//   G = p f'(p) = q^gamma (1 - gamma p log p / q)   (the gradient factor)

// q^gamma: repeated products for the integer gammas the paper uses (1, 2, 3, 5, ...), as torch's
// pow does for 2 and 3, several times cheaper than powf; powf for the rest.
template <typename T>
CK_HD T pow_gamma(T q, T gamma) {
  if (gamma == T(0)) return T(1);
  if (gamma <= T(8) && gamma == T(static_cast<int>(gamma))) {
    T r = q;
    for (int j = static_cast<int>(gamma); j > 1; --j) r *= q;
    return r;
  }
  return ck_pow(q, gamma);
}

// The terms for log-probability lp, given p = exp(lp) (callers that chose gamma from p have it).
template <typename T>
CK_HD FocalTerms<T> focal_terms(T lp, T p, T gamma) {
  // 1 - p only loses bits as p -> 1; below p = 1/2 it is as good as expm1 and cheaper.
  const T q = lp < T(-0.6931471805599453) ? T(1) - p : -ck_expm1(lp);
  const T qg = pow_gamma(q, gamma);
  // log p / q -> -1 as q -> 0; the naive q^(gamma-1) form is Inf * 0 = NaN there for gamma < 1.
  const T ratio = q > T(0) ? lp / q : T(-1);
  // p == 0 (underflow or a -inf logit) contributes nothing, even when log p is -inf.
  const T p_ratio = p > T(0) ? p * ratio : T(0);
  FocalTerms<T> out;
  out.p = p;
  out.q = q;
  out.f = qg * lp;
  out.G = qg * (T(1) - gamma * p_ratio);
  return out;
}

template <typename T>
CK_HD FocalTerms<T> focal_terms(T lp, T gamma) {
  return focal_terms(lp, ck_exp(lp), gamma);
}

// With a_k = t_k w_k (smoothed target times class weight), S_other = sum over k != y of a_k G_k
// and aG_y = a_y G_y, the true-class gradient p_y (S_other + aG_y) - aG_y, regrouped so that
// nothing cancels as p_y -> 1. Computed in the math precision and rounded once when stored.
template <typename T>
CK_HD T true_class_grad(const FocalTerms<T>& ty, T S_other, T aG_y) {
  return ty.p * S_other - ty.q * aG_y;
}


// A row whose max is +inf is NaN, as in torch (x - max is inf - inf there).
template <typename T>
CK_HD bool poisoned_max(T m) {
  return m == static_cast<T>(INFINITY);
}

CK_CAPABILITY_END

}  // namespace calibkernels
