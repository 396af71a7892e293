// CUDA implementation of calibkernels::calibration_bins: checks, allocations, the current
// stream, the torch-free launchers of calibration_kernels.cu (two launches for the top-label
// state, its totals and errors), and (mode -1) the choice between the two readings made on the
// device: no host synchronisation.
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
  const at::TensorOptions i64 = x.options().dtype(at::kLong), f64 = x.options().dtype(at::kDouble);
  const at::Tensor samples = at::empty({N, kSampleColumns}, x.options().dtype(math_type(x.scalar_type())));
  const at::Tensor correct = at::empty({N}, x.options().dtype(at::kBool));
  const at::Tensor inside = at::empty({N}, x.options().dtype(at::kBool));
  // Workspace of the top kernel: (readings, blocks, n_bins) counts and hits, sums, then the
  // (readings, blocks, 2) Brier and NLL sums; the blocks' [0, 1] flags and the ticket.
  const int64_t blocks = calib_top_blocks(N), slots = (mode == kAuto ? 2 : 1) * blocks;
  const at::Tensor ws_i64 = at::empty({2 * slots * n_bins}, i64);
  const at::Tensor ws_f64 = at::empty({slots * (n_bins + 2)}, f64);
  const at::Tensor ws_i32 = at::empty({blocks + 1}, x.options().dtype(at::kInt));
  const at::Tensor counts = at::empty({n_bins}, i64), conf_sums = at::empty({n_bins}, f64),
                   hits = at::empty({n_bins}, i64), totals = at::empty({kCalibTotals}, f64);

  CalibrationLaunch p{};
  p.dtype = to_dtype(x.scalar_type());
  p.input = x.const_data_ptr();
  p.target = t.const_data_ptr<int64_t>();
  p.boundaries = beta.const_data_ptr<float>();
  p.n_bins = n_bins;
  p.n_rows = N;
  p.n_classes = C;
  p.ignore_index = ignore_index;
  p.mode = static_cast<int>(mode);
  p.vectorized = rows_aligned16(x);
  p.samples = samples.mutable_data_ptr();
  p.correct = correct.mutable_data_ptr<bool>();
  p.inside = inside.mutable_data_ptr<bool>();
  p.counts = counts.mutable_data_ptr<int64_t>();
  p.conf_sums = conf_sums.mutable_data_ptr<double>();
  p.hits = hits.mutable_data_ptr<int64_t>();
  p.totals = totals.mutable_data_ptr<double>();
  p.part_counts = ws_i64.mutable_data_ptr<int64_t>();
  p.part_hits = p.part_counts + slots * n_bins;
  p.part_sums = ws_f64.mutable_data_ptr<double>();
  p.part_totals = p.part_sums + slots * n_bins;
  p.part_inside = ws_i32.mutable_data_ptr<int>();
  p.ticket = reinterpret_cast<unsigned*>(p.part_inside + blocks);
  check(launch_calibration_rows(p, stream));
  check(launch_calibration_top(p, stream));

  // kAuto: the reading kept, as the top kernel decided it on the device (no host sync).
  const auto probabilities = [&] { return totals.select(0, 2).gt(0.5); };
  at::Tensor conf = at::empty({0}, samples.options());
  if (per_sample) {
    conf = mode == kAuto ? at::where(probabilities(), samples.select(1, kConfP),
                                     samples.select(1, kConfL))
                         : samples.select(1, mode == kLogits ? kConfL : kConfP);
    conf = conf.masked_fill(t.eq(ignore_index), 0).contiguous();  // ignored: 0 on every backend
  }
  std::vector<at::Tensor> cw(3);
  if (!classwise) {
    cw = {at::empty({0, n_bins}, i64), at::empty({0, n_bins}, f64), at::empty({0, n_bins}, i64)};
  } else {
    // One chunk (C x n_bins over 4M slots): the kernel writes the state itself, no partials.
    const int64_t cw_chunks = calib_classwise_chunks(N, C, n_bins);
    const int64_t parts = cw_chunks > 1 ? cw_chunks : 0;
    const at::Tensor cw_part_counts = at::empty({parts, C, n_bins}, i64),
                     cw_part_sums = at::empty({parts, C, n_bins}, f64),
                     cw_part_hits = at::empty({parts, C, n_bins}, i64);
    const auto reading = [&](bool from_logits) {
      std::vector<at::Tensor> o{at::empty({C, n_bins}, i64), at::empty({C, n_bins}, f64),
                                at::empty({C, n_bins}, i64)};
      p.cw_counts = o[0].mutable_data_ptr<int64_t>();
      p.cw_conf_sums = o[1].mutable_data_ptr<double>();
      p.cw_hits = o[2].mutable_data_ptr<int64_t>();
      const bool one = parts == 0;
      p.cw_part_counts = one ? p.cw_counts : cw_part_counts.mutable_data_ptr<int64_t>();
      p.cw_part_sums = one ? p.cw_conf_sums : cw_part_sums.mutable_data_ptr<double>();
      p.cw_part_hits = one ? p.cw_hits : cw_part_hits.mutable_data_ptr<int64_t>();
      check(launch_calibration_classwise(p, from_logits, stream));
      return o;
    };
    if (mode == kAuto) {
      const std::vector<at::Tensor> l = reading(true), pr = reading(false);
      const at::Tensor probs = probabilities();
      for (int j = 0; j < 3; ++j) cw[j] = at::where(probs, pr[j], l[j]);
    } else {
      cw = reading(mode == kLogits);
    }
  }
  // a NaN confidence (a NaN or +inf logit, a poisoned reading) is never correct, nor an
  // ignored row (its target may be a class)
  return {counts, conf_sums, hits, cw[0], cw[1], cw[2], conf,
          per_sample ? correct.logical_and(t.ne(ignore_index))
                           .logical_and_(conf.isnan().logical_not())
                     : at::empty({0}, correct.options()),
          totals};
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CUDA, m) { m.impl("calibration_bins", &calibration_bins_cuda); }

}  // namespace calibkernels
