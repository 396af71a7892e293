// CUDA implementation of calibkernels::calibration_bins: checks, allocations, the current
// stream, and the torch-free launcher of calibration_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "cuda_ops.h"
#include "calibration_launch.h"

namespace calibkernels {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor>;

Outputs calibration_bins_cuda(const at::Tensor& input, const at::Tensor& target,
                              const at::Tensor& boundaries, bool from_logits,
                              int64_t ignore_index, bool classwise, bool per_sample) {
  check_calibration_args(input, target, boundaries);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  TORCH_CHECK_VALUE(!classwise || n_bins <= kCalibMaxClasswiseBins,
                    "calibration: classwise on CUDA supports n_bins <= ", kCalibMaxClasswiseBins,
                    ", got ", n_bins);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);
  const at::TensorOptions acc = x.options().dtype(acc_type);

  at::Tensor counts = at::empty({n_bins}, i64), conf_sums = at::empty({n_bins}, f64),
             hits = at::empty({n_bins}, i64);
  const int64_t cw_rows = classwise ? C : 0;
  at::Tensor cw_counts = at::empty({cw_rows, n_bins}, i64),
             cw_conf_sums = at::empty({cw_rows, n_bins}, f64),
             cw_hits = at::empty({cw_rows, n_bins}, i64);
  at::Tensor confidence = at::empty({N}, acc), correct = at::empty({N}, x.options().dtype(at::kBool));
  const bool stats = classwise && from_logits;
  at::Tensor row_max = at::empty({stats ? N : 0}, acc), row_sum = at::empty({stats ? N : 0}, acc);
  const int64_t chunks = calib_top_chunks(N);
  at::Tensor part_counts = at::empty({chunks, n_bins}, i64),
             part_sums = at::empty({chunks, n_bins}, f64),
             part_hits = at::empty({chunks, n_bins}, i64);
  const int64_t cw_chunks = classwise ? calib_classwise_chunks(N, C, n_bins) : 0;
  at::Tensor cw_part_counts = at::empty({cw_chunks, cw_rows, n_bins}, i64),
             cw_part_sums = at::empty({cw_chunks, cw_rows, n_bins}, f64),
             cw_part_hits = at::empty({cw_chunks, cw_rows, n_bins}, i64);

  CalibrationLaunch p{};
  p.dtype = to_dtype(x.scalar_type());
  p.input = x.const_data_ptr();
  p.target = t.const_data_ptr<int64_t>();
  p.boundaries = beta.const_data_ptr<float>();
  p.n_bins = n_bins;
  p.n_rows = N;
  p.n_classes = C;
  p.ignore_index = ignore_index;
  p.from_logits = from_logits;
  p.classwise = classwise;
  p.vectorized = rows_aligned16(x);
  p.confidence = confidence.mutable_data_ptr();
  p.correct = correct.mutable_data_ptr<bool>();
  p.row_max = stats ? row_max.mutable_data_ptr() : nullptr;
  p.row_sum = stats ? row_sum.mutable_data_ptr() : nullptr;
  p.counts = counts.mutable_data_ptr<int64_t>();
  p.conf_sums = conf_sums.mutable_data_ptr<double>();
  p.hits = hits.mutable_data_ptr<int64_t>();
  p.cw_counts = classwise ? cw_counts.mutable_data_ptr<int64_t>() : nullptr;
  p.cw_conf_sums = classwise ? cw_conf_sums.mutable_data_ptr<double>() : nullptr;
  p.cw_hits = classwise ? cw_hits.mutable_data_ptr<int64_t>() : nullptr;
  p.part_counts = part_counts.mutable_data_ptr<int64_t>();
  p.part_sums = part_sums.mutable_data_ptr<double>();
  p.part_hits = part_hits.mutable_data_ptr<int64_t>();
  p.cw_part_counts = classwise ? cw_part_counts.mutable_data_ptr<int64_t>() : nullptr;
  p.cw_part_sums = classwise ? cw_part_sums.mutable_data_ptr<double>() : nullptr;
  p.cw_part_hits = classwise ? cw_part_hits.mutable_data_ptr<int64_t>() : nullptr;
  const cudaError_t err = launch_calibration(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "calibration: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  if (!per_sample) {
    confidence = at::empty({0}, acc);
    correct = at::empty({0}, x.options().dtype(at::kBool));
  }
  return {counts, conf_sums, hits, cw_counts, cw_conf_sums, cw_hits, confidence, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace calibkernels
