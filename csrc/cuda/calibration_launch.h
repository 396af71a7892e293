// The CUDA calibration launcher: raw pointers and sizes only (no torch headers in .cu files).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace calibkernels {

// Rows per block of the top-label partial sums; classwise partial sums are capped in memory.
constexpr int64_t kCalibRowsPerChunk = 2048;
constexpr int64_t kCalibClasswiseMaxPartials = int64_t(1) << 22;  // chunks x C x n_bins
constexpr int kCalibMaxClasswiseBins = 96;  // shared memory of the classwise kernel

inline int64_t calib_top_chunks(int64_t n_rows) {
  return n_rows == 0 ? 1 : (n_rows + kCalibRowsPerChunk - 1) / kCalibRowsPerChunk;
}
inline int64_t calib_classwise_chunks(int64_t n_rows, int64_t n_classes, int n_bins) {
  const int64_t by_memory = kCalibClasswiseMaxPartials / (n_classes * n_bins);
  const int64_t by_rows = calib_top_chunks(n_rows);
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
  bool from_logits, classwise, vectorized;
  void* confidence;  // (n_rows) math type: top probability (NaN: poisoned sample)
  bool* correct;     // (n_rows)
  void* row_max;     // (n_rows) math type, classwise from logits only
  void* row_sum;     // (n_rows) math type, classwise from logits only
  int64_t* counts;   // (n_bins)
  double* conf_sums;
  int64_t* hits;
  int64_t* cw_counts;  // (n_classes, n_bins), classwise only
  double* cw_conf_sums;
  int64_t* cw_hits;
  int64_t* part_counts;  // (calib_top_chunks, n_bins) workspace
  double* part_sums;
  int64_t* part_hits;
  int64_t* cw_part_counts;  // (calib_classwise_chunks, n_classes, n_bins) workspace
  double* cw_part_sums;
  int64_t* cw_part_hits;
};

cudaError_t launch_calibration(const CalibrationLaunch& args, cudaStream_t stream);

}  // namespace calibkernels
