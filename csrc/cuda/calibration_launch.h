// The CUDA calibration launchers: raw pointers and sizes only (no torch headers in .cu files).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace calibkernels {

// Rows per block of the top-label sums (calibration_top_kernel), and per chunk of the classwise
// and sweep partial sums; classwise partial sums are capped in memory.
constexpr int64_t kCalibTopRows = 1024;
constexpr int64_t kCalibRowsPerChunk = 2048;
constexpr int64_t kCalibClasswiseMaxPartials = int64_t(1) << 22;  // chunks x C x n_bins
constexpr int kCalibSharedClasswiseBins = 96;  // classwise bins in 48 KB of shared memory
constexpr int kCalibMaxTemperatures = 256;

// Per-sample values of the rows kernel (columns of `samples`): the softmax reading (confidence,
// Brier, NLL), the probability reading (the same three), the row's max and sum of exp(x - max).
enum SampleColumn : int { kConfL, kBrierL, kNllL, kConfP, kBrierP, kNllP, kRowMax, kRowSum,
                          kSampleColumns };

// totals: sums of Brier and NLL, 1 if read as probabilities, then ECE, MCE, RMSCE.
constexpr int kCalibTotals = 6;

inline int64_t calib_top_blocks(int64_t n_rows) {
  return n_rows == 0 ? 1 : (n_rows + kCalibTopRows - 1) / kCalibTopRows;
}
inline int64_t calib_chunks(int64_t n_rows) {
  return n_rows == 0 ? 1 : (n_rows + kCalibRowsPerChunk - 1) / kCalibRowsPerChunk;
}
inline int64_t calib_classwise_chunks(int64_t n_rows, int64_t n_classes, int n_bins) {
  const int64_t by_memory = kCalibClasswiseMaxPartials / (n_classes * n_bins);
  const int64_t by_rows = calib_chunks(n_rows);
  const int64_t g = by_rows < by_memory ? by_rows : by_memory;
  return g < 1 ? 1 : g;
}

struct CalibrationLaunch {
  DType dtype;
  const void* input;  // (n_rows, n_classes) logits or probabilities, contiguous
  const int64_t* target;
  const float* boundaries;  // (n_bins + 1)
  int n_bins;
  int64_t n_rows, n_classes, ignore_index;
  int mode;  // ops.h's kLogits (1), kProbabilities (0), kAuto (-1: both, one picked on the device)
  bool vectorized;
  void* samples;   // (n_rows, kSampleColumns) math type (NaN confidence: a poisoned sample)
  bool* correct;   // (n_rows)
  bool* inside;    // (n_rows): every value of a kept sample in [0, 1] (true when ignored)
  int64_t* counts;  // (n_bins)
  double* conf_sums;
  int64_t* hits;
  double* totals;  // (kCalibTotals)
  int64_t* cw_counts;  // (n_classes, n_bins)
  double* cw_conf_sums;
  int64_t* cw_hits;
  int64_t* part_counts;  // (readings, calib_top_blocks, n_bins) workspace
  double* part_sums;
  int64_t* part_hits;
  double* part_totals;      // (readings, calib_top_blocks, 2) workspace
  int* part_inside;         // (calib_top_blocks) workspace: every kept value in [0, 1]
  unsigned* ticket;         // zeroed by the rows kernel, counted by the top kernel's blocks
  int64_t* cw_part_counts;  // (calib_classwise_chunks, n_classes, n_bins); cw_* if one chunk
  double* cw_part_sums;
  int64_t* cw_part_hits;
};

// The rows, once: samples, correct, inside (and the ticket zeroed).
cudaError_t launch_calibration_rows(const CalibrationLaunch& p, cudaStream_t stream);
// From samples, in one launch: the top-label state of the reading p.mode asks for (kAuto: both
// formed, the one that holds kept), Brier and NLL sums, which reading, ECE, MCE and RMSCE:
// counts, conf_sums, hits, totals.
cudaError_t launch_calibration_top(const CalibrationLaunch& p, cudaStream_t stream);
// The classwise state of one reading (reads the input again): cw_counts, cw_conf_sums, cw_hits.
cudaError_t launch_calibration_classwise(const CalibrationLaunch& p, bool from_logits,
                                         cudaStream_t stream);

struct SweepLaunch {
  DType dtype;
  const void* logits;  // (n_rows, n_classes), contiguous
  const int64_t* target;
  const float* boundaries;
  int n_bins, n_temps;
  int64_t n_rows, n_classes, ignore_index;
  double temperatures[kCalibMaxTemperatures];
  void* conf;     // (n_rows, n_temps) math type workspace
  void* nll;      // (n_rows, n_temps) math type workspace
  bool* correct;  // (n_rows) workspace
  int64_t* counts;  // (n_temps, n_bins)
  double* conf_sums;
  int64_t* hits;
  double* nll_sums;      // (n_temps)
  int64_t* part_counts;  // (calib_chunks, n_temps, n_bins) workspace
  double* part_sums;
  int64_t* part_hits;
  double* part_nll;  // (calib_chunks, n_temps) workspace
};

cudaError_t launch_calibration_sweep(const SweepLaunch& p, cudaStream_t stream);

}  // namespace calibkernels
