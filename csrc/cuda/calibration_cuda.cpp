// CUDA implementation of calibkernels::calibration_bins: checks, allocations, the current
// stream, the torch-free launchers of calibration_kernels.cu, and (mode -1) the choice between
// the two readings made on the device with at::where: no host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../ops.h"
#include "calibration_launch.h"
#include "cuda_ops.h"

namespace calibkernels {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "calibration: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

Outputs calibration_bins_cuda(const at::Tensor& input, const at::Tensor& target,
                              const at::Tensor& boundaries, int64_t mode, int64_t ignore_index,
                              bool classwise, bool per_sample) {
  check_calibration_args(input, target, boundaries, mode);
  c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor x = input.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  TORCH_CHECK_VALUE(!classwise || n_bins <= kCalibMaxClasswiseBins,
                    "calibration: classwise on CUDA supports n_bins <= ", kCalibMaxClasswiseBins,
                    ", got ", n_bins);
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);
  const at::Tensor samples = at::empty({N, kSampleColumns}, x.options().dtype(math_type(x.scalar_type())));
  const at::Tensor correct = at::empty({N}, x.options().dtype(at::kBool));
  const at::Tensor inside = at::empty({N}, x.options().dtype(at::kBool));
  const int64_t chunks = calib_top_chunks(N);
  const int64_t cw_chunks = classwise ? calib_classwise_chunks(N, C, n_bins) : 0;
  const int64_t cw_rows = classwise ? C : 0;
  at::Tensor part_counts = at::empty({chunks, n_bins}, i64),
             part_sums = at::empty({chunks, n_bins}, f64),
             part_hits = at::empty({chunks, n_bins}, i64),
             part_totals = at::empty({chunks, 2}, f64);
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
  p.vectorized = rows_aligned16(x);
  p.samples = samples.mutable_data_ptr();
  p.correct = correct.mutable_data_ptr<bool>();
  p.inside = inside.mutable_data_ptr<bool>();
  p.part_counts = part_counts.mutable_data_ptr<int64_t>();
  p.part_sums = part_sums.mutable_data_ptr<double>();
  p.part_hits = part_hits.mutable_data_ptr<int64_t>();
  p.part_totals = part_totals.mutable_data_ptr<double>();
  p.cw_part_counts = classwise ? cw_part_counts.mutable_data_ptr<int64_t>() : nullptr;
  p.cw_part_sums = classwise ? cw_part_sums.mutable_data_ptr<double>() : nullptr;
  p.cw_part_hits = classwise ? cw_part_hits.mutable_data_ptr<int64_t>() : nullptr;
  check(launch_calibration_rows(p, stream));

  // One reading's outputs: counts, conf_sums, hits, cw x 3, confidence, totals (2).
  const auto reading = [&](bool from_logits) {
    std::vector<at::Tensor> o{at::empty({n_bins}, i64), at::empty({n_bins}, f64),
                              at::empty({n_bins}, i64), at::zeros({cw_rows, n_bins}, i64),
                              at::zeros({cw_rows, n_bins}, f64), at::zeros({cw_rows, n_bins}, i64),
                              samples.select(1, from_logits ? kConfL : kConfP),
                              at::empty({2}, f64)};
    p.counts = o[0].mutable_data_ptr<int64_t>();
    p.conf_sums = o[1].mutable_data_ptr<double>();
    p.hits = o[2].mutable_data_ptr<int64_t>();
    p.totals = o[7].mutable_data_ptr<double>();
    check(launch_calibration_top(p, from_logits, stream));
    if (classwise) {
      p.cw_counts = o[3].mutable_data_ptr<int64_t>();
      p.cw_conf_sums = o[4].mutable_data_ptr<double>();
      p.cw_hits = o[5].mutable_data_ptr<int64_t>();
      check(launch_calibration_classwise(p, from_logits, stream));
    }
    return o;
  };
  std::vector<at::Tensor> out;
  at::Tensor probs;
  if (mode == kAuto) {
    // probabilities when every value of a kept sample lies in [0, 1], decided on the device
    probs = inside.all();
    const std::vector<at::Tensor> l = reading(true), pr = reading(false);
    for (size_t j = 0; j < l.size(); ++j) out.push_back(at::where(probs, pr[j], l[j]));
  } else {
    out = reading(mode == kLogits);
    probs = at::full({}, mode == kProbabilities, x.options().dtype(at::kBool));
  }
  const at::Tensor totals = at::cat({out[7], probs.to(at::kDouble).reshape({1})});
  const at::Tensor conf = per_sample ? out[6].contiguous() : at::empty({0}, samples.options());
  return {out[0], out[1], out[2], out[3], out[4], out[5], conf,
          per_sample ? correct : at::empty({0}, correct.options()), totals};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace calibkernels
