// CUDA implementation of calibkernels::calibration_sweep: checks, allocations, the stream, and
// the torch-free launcher of calibration_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ops.h"
#include "calibration_launch.h"
#include "cuda_ops.h"

namespace calibkernels {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> calibration_sweep_cuda(
    const at::Tensor& logits, const at::Tensor& target, const at::Tensor& temperatures,
    const at::Tensor& boundaries, int64_t ignore_index) {
  check_sweep_args(logits, target, temperatures, boundaries);
  c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const at::Tensor t = target.to(at::kLong).contiguous();
  const at::Tensor beta = boundaries.contiguous();
  const at::Tensor temps = temperatures.contiguous();  // on the CPU: read here, passed by value
  const int64_t N = x.size(0), C = x.size(1), K = temps.numel();
  const int n_bins = static_cast<int>(beta.size(0) - 1);
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);
  const at::TensorOptions acc = x.options().dtype(math_type(x.scalar_type()));
  const int64_t chunks = calib_chunks(N);
  at::Tensor conf = at::empty({N, K}, acc), nll = at::empty({N, K}, acc),
             correct = at::empty({N}, x.options().dtype(at::kBool));
  at::Tensor counts = at::empty({K, n_bins}, i64), conf_sums = at::empty({K, n_bins}, f64),
             hits = at::empty({K, n_bins}, i64), nll_sums = at::empty({K}, f64);
  at::Tensor part_counts = at::empty({chunks, K, n_bins}, i64),
             part_sums = at::empty({chunks, K, n_bins}, f64),
             part_hits = at::empty({chunks, K, n_bins}, i64),
             part_nll = at::empty({chunks, K}, f64);
  SweepLaunch p{};
  p.dtype = to_dtype(x.scalar_type());
  p.logits = x.const_data_ptr();
  p.target = t.const_data_ptr<int64_t>();
  p.boundaries = beta.const_data_ptr<float>();
  p.n_bins = n_bins;
  p.n_temps = static_cast<int>(K);
  p.n_rows = N;
  p.n_classes = C;
  p.ignore_index = ignore_index;
  for (int64_t k = 0; k < K; ++k) p.temperatures[k] = temps.const_data_ptr<double>()[k];
  p.conf = conf.mutable_data_ptr();
  p.nll = nll.mutable_data_ptr();
  p.correct = correct.mutable_data_ptr<bool>();
  p.counts = counts.mutable_data_ptr<int64_t>();
  p.conf_sums = conf_sums.mutable_data_ptr<double>();
  p.hits = hits.mutable_data_ptr<int64_t>();
  p.nll_sums = nll_sums.mutable_data_ptr<double>();
  p.part_counts = part_counts.mutable_data_ptr<int64_t>();
  p.part_sums = part_sums.mutable_data_ptr<double>();
  p.part_hits = part_hits.mutable_data_ptr<int64_t>();
  p.part_nll = part_nll.mutable_data_ptr<double>();
  const cudaError_t err = launch_calibration_sweep(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "calibration_sweep: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  return {counts, conf_sums, hits, nll_sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) {
  m.impl("calibration_sweep", &calibration_sweep_cuda);
}

}  // namespace calibkernels
