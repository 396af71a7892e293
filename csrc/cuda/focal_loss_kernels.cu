// The CUDA focal loss's launchers (CONTRACT §1): the prepare kernel (the ticket, and the mean's
// divisor in parts), then the class-index fast path (focal_loss_sparse_kernels.cu) where it
// applies, else the general row kernels (focal_loss_kernels.cuh, compiled a dtype a file).
#include "focal_loss_kernels.cuh"

namespace calibkernels {
namespace {

constexpr int kReduceThreads = 1024;  // a block of the prepare kernel: 8 KB of targets in flight

// Before a reduced loss: a zeroed ticket and, for the mean, its divisor in kDivisorParts parts,
// one a block, each the sum of w_y over the non-ignored samples of its share of the rows (NaN if
// a target is out of range: the loss and gradient are then NaN, never silently wrong; the share's
// size for probability targets). Fixed order within a block; the readers add the parts in order.
template <typename A>
__global__ void __launch_bounds__(kReduceThreads) focal_loss_prepare_kernel(const FocalLossLaunch p) {
  __shared__ double smem[kReduceThreads];
  if (p.reduction != ReductionKind::Mean) {  // one block: only the ticket
    if (threadIdx.x == 0) *p.ticket = 0u;
    return;
  }
  const A* __restrict__ weight = static_cast<const A*>(p.weight);
  const int64_t share = (p.n_rows + kDivisorParts - 1) / kDivisorParts;
  const int64_t begin = blockIdx.x * share;
  const int64_t end = begin + share < p.n_rows ? begin + share : p.n_rows;
  double acc = 0.0;
  if (p.target != nullptr) {
#pragma unroll 4
    for (int64_t i = begin + threadIdx.x; i < end; i += kReduceThreads) {
      const int64_t y = p.target[i];
      const double w_y = (y < 0 || y >= p.n_classes) ? NAN
                         : weight ? static_cast<double>(weight[y]) : 1.0;
      acc += y == p.ignore_index ? 0.0 : w_y;
    }
  } else if (threadIdx.x == 0 && end > begin) {
    acc = static_cast<double>(end - begin);
  }
  smem[threadIdx.x] = acc;
  __syncthreads();
  for (int half = kReduceThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) smem[threadIdx.x] += smem[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    p.divisor_parts[blockIdx.x] = smem[0];
    if (blockIdx.x == 0) *p.ticket = 0u;
  }
}

}  // namespace

int64_t focal_loss_row_blocks(const FocalLossLaunch& p) {
  const int64_t sparse = focal_loss_sparse_blocks(p);
  if (sparse > 0) return sparse;
  int64_t blocks = 1;
  dispatch_dtype(p.dtype, [&](auto tag) {
    return general::by_row_length<decltype(tag)>(p, [&](auto tpr) {
      blocks = general::row_grid<decltype(tpr)::value>(p);
      return cudaSuccess;
    });
  });
  return blocks;
}

cudaError_t launch_focal_loss_forward(const FocalLossLaunch& p, cudaStream_t stream) {
  if (p.reduction != ReductionKind::None) {
    const int parts = p.reduction == ReductionKind::Mean ? kDivisorParts : 1;
    if (p.dtype == DType::Float64) {
      focal_loss_prepare_kernel<double><<<parts, kReduceThreads, 0, stream>>>(p);
    } else {
      focal_loss_prepare_kernel<float><<<parts, kReduceThreads, 0, stream>>>(p);
    }
  }
  cudaError_t err = cudaSuccess;
  if ((p.n_rows > 0 || p.reduction != ReductionKind::None) &&
      !launch_focal_loss_sparse_forward(p, stream, &err)) {
    err = dispatch_dtype(p.dtype, [&](auto tag) {
      launch_focal_loss_rows<decltype(tag)>(p, true, stream);
      return cudaSuccess;
    });
  }
  return err != cudaSuccess ? err : cudaGetLastError();
}

cudaError_t launch_focal_loss_backward(const FocalLossLaunch& p, cudaStream_t stream) {
  if (p.n_rows == 0) return cudaSuccess;
  const cudaError_t err = dispatch_dtype(p.dtype, [&](auto tag) {
    launch_focal_loss_rows<decltype(tag)>(p, false, stream);
    return cudaSuccess;
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

}  // namespace calibkernels
