// Focal loss forward on CUDA for class-index targets without label smoothing: the training case
// (CONTRACT §1). Off the true class the gradient is c * p_j, one coefficient c per row, so a row
// is: its 16-byte chunks loaded into registers (every load issued before the first use), the max,
// one exp2 per element for the sum, the row's scalars, then one exp and one multiply per element
// for the gradient, stored from the same registers. The logits are read once and the gradient
// written once. By row length (sparse_layout): several rows per warp or block for short rows, one
// row per block up to 64 KB (32768 bf16 classes), and on sm_90 one row per thread-block cluster
// whose CTAs exchange their partial results through distributed shared memory and merge them in
// rank order (the same bits in every CTA: deterministic). Rows that are not a multiple of 16
// bytes are read as the tensor's chunks too, masking the two they share with their neighbours
// (RowChunks). Every other case (probability targets, smoothing, float64, a base not 16-byte
// aligned, no clusters for a long row) is focal_loss_kernels.cuh's, which also runs the gradient
// phase from the RowStats written here.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <type_traits>

#include "focal_loss_common.cuh"
#include "row_layout.cuh"

namespace calibkernels {
namespace {

// A CTA of a cluster holds 512 threads of 8 chunks (64 KB of a row); 4 chunks (32 KB) where rows
// share chunks with their neighbours: their masks and element stores need the registers.
constexpr int kClusterThreads = 512;
constexpr int cluster_items(bool aligned) { return aligned ? 8 : 4; }

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }  // NaN-blind, as max
};
struct Add2 {
  __device__ float2 operator()(float2 a, float2 b) const { return {a.x + b.x, a.y + b.y}; }
};

template <typename V>
__device__ __forceinline__ V shfl(V v, int lane) {
  if constexpr (std::is_same_v<V, float2>) {
    return {__shfl_sync(0xffffffffu, v.x, lane), __shfl_sync(0xffffffffu, v.y, lane)};
  } else {
    return __shfl_sync(0xffffffffu, v, lane);
  }
}

// Over the CTAs of a cluster (one row): each publishes its value in `slot`, and every CTA merges
// all of them in rank order. The caller's next cluster_reduce (another slot) or the final
// cluster sync keeps a slot from being rewritten while another CTA may still read it.
template <int CLUSTER, typename V, typename Op>
__device__ __forceinline__ V cluster_reduce(V v, V* slot, Op op) {
  if constexpr (CLUSTER == 1) {
    return v;
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    if (threadIdx.x == 0) *slot = v;
    cluster.sync();
    // Lane j of every warp reads rank j's value; each warp merges them in rank order.
    const V mine = *cluster.map_shared_rank(slot, static_cast<int>(threadIdx.x % 32) % CLUSTER);
    v = shfl(mine, 0);
#pragma unroll
    for (int r = 1; r < CLUSTER; ++r) v = op(v, shfl(mine, r));
#else
    __trap();  // never launched: the host launches clusters only on sm_90 code
#endif
    return v;
  }
}

__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

// -inf in a 16-bit or float storage type: a chunk's elements outside its row never count.
__device__ __forceinline__ float neg_inf(float) { return -INFINITY; }
__device__ __forceinline__ __half neg_inf(__half) { return __ushort_as_half(0xfc00u); }
__device__ __forceinline__ __nv_bfloat16 neg_inf(__nv_bfloat16) {
  return __ushort_as_bfloat16(0xff80u);
}

// This thread's 16-byte chunks of a row: the chunks of the tensor that hold any of the row's
// elements, split over the CTAs of a cluster. A row that is not a multiple of 16 bytes starts
// `head` elements into its first chunk and may end inside its last; those two chunks are shared
// with the neighbouring rows (loaded whole, stored element by element).
template <int VEC, int TPR, int ITEMS, int CLUSTER>
struct RowChunks {
  int head;       // elements of the first chunk before the row
  int first;      // this thread's chunks: first + i TPR (from the row's first chunk), i < ITEMS
  unsigned mine;  // bit i: chunk i is in the row (and this CTA's part)
  __device__ __forceinline__ RowChunks(int head_, int C, int rank, int lane) : head(head_) {
    const int chunks = (head + C + VEC - 1) / VEC;
    const int per_cta = (chunks + CLUSTER - 1) / CLUSTER;
    const int chunk0 = rank * per_cta;
    const int n_local = max(0, min(per_cta, chunks - chunk0));
    first = chunk0 + lane;
    mine = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) mine |= (i * TPR + lane < n_local ? 1u : 0u) << i;
  }
  // Element k of chunk i is the row's iff lo(i) <= k < lo(i) + C.
  __device__ __forceinline__ int lo(int i) const { return head - (first + i * TPR) * VEC; }
};

// ALIGNED: every row starts 16-byte aligned (C a multiple of 16 bytes); else rows share chunks.
template <typename T, int TPR, int ITEMS, int CLUSTER, bool ALIGNED>
__global__ void __launch_bounds__(threads_of(TPR), 2048 / threads_of(TPR) / 2)
    focal_loss_sparse_forward_kernel(const FocalLossLaunch p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int THREADS = threads_of(TPR);
  constexpr int ROWS = THREADS / TPR;  // rows of a block (1 from 256 threads a row)
  using Chunk = Pack<T, VEC>;
  using Chunks = RowChunks<VEC, TPR, ITEMS, CLUSTER>;
  __shared__ float smem_max[THREADS / 32];
  __shared__ float2 smem_sum[THREADS / 32];
  __shared__ float slot_max;  // this CTA's part of the row, read by the other CTAs of the cluster
  __shared__ float2 slot_sum;
  __shared__ double smem_loss[ROWS];

  const int C = static_cast<int>(p.n_classes);  // < 2^31 on this path: 32-bit offsets in a row
  const int rank = CLUSTER > 1 ? static_cast<int>(blockIdx.x % CLUSTER) : 0;
  const int lane = threadIdx.x % TPR, group = threadIdx.x / TPR;
  const Chunks every_row(0, C, rank, lane);  // ALIGNED: the same chunks in every row
  const float* __restrict__ w = static_cast<const float*>(p.weight);
  const float scale_all =
      p.reduction == ReductionKind::Mean ? 1.0f / static_cast<float>(mean_divisor(p)) : 1.0f;
  const int64_t groups = gridDim.x / CLUSTER;  // rows in flight: ROWS per block or cluster
  __shared__ double block_loss;                // this block's rows, in order (by thread 0)
  if (threadIdx.x == 0) block_loss = 0.0;      // (in shared memory: registers are for the row)

  for (int64_t first = static_cast<int64_t>(blockIdx.x / CLUSTER) * ROWS; first < p.n_rows;
       first += groups * ROWS) {
    // Threads past the last row still join every shuffle and barrier (uniform control flow).
    const int64_t r = first + group;
    const bool active = r < p.n_rows;
    const int64_t row_i = active ? r : 0;
    const int64_t y64 = active ? p.target[row_i] : p.ignore_index;
    const bool ignored = y64 == p.ignore_index;
    const bool bad = !ignored && (y64 < 0 || y64 >= C);  // never read it
    const bool live = active && !ignored && !bad;
    const int y = live ? static_cast<int>(y64) : 0;
    const int64_t e0 = row_i * p.n_classes;  // the row's first element in the tensor
    const T* __restrict__ row = static_cast<const T*>(p.logits) + e0;
    const Chunks rc = ALIGNED ? every_row : Chunks(static_cast<int>(e0 % VEC), C, rank, lane);
    const unsigned mine = rc.mine;
    const Chunk* __restrict__ row_chunks =
        reinterpret_cast<const Chunk*>(static_cast<const T*>(p.logits) + (e0 - rc.head)) +
        rc.first;

    Chunk x[ITEMS];
    if constexpr (ALIGNED) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (active && (mine >> i & 1u)) x[i] = row_chunks[i * TPR];
      }
    } else if (e0 + C <= p.n_rows * p.n_classes / VEC * VEC) {  // in the tensor's whole chunks
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        if (active && (mine >> i & 1u)) x[i] = row_chunks[i * TPR];
      }
    } else {  // a row in the tensor's last chunk, which ends past it (N C % VEC != 0): elements
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const T* e = reinterpret_cast<const T*>(row_chunks + i * TPR);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (active && (mine >> i & 1u)) x[i].v[k] = k < rc.lo(i) + C ? e[k] : neg_inf(T{});
        }
      }
    }
    // Bit i: chunk i is shared with a neighbouring row; its elements outside this row are -inf
    // (they never count) and are not stored.
    unsigned shared = 0;
    if constexpr (!ALIGNED) {
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int lo = rc.lo(i);
        shared |= ((mine >> i & 1u) && (lo > 0 || lo + C < VEC) ? 1u : 0u) << i;
      }
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int lo = rc.lo(i);
        if (active && (shared >> i & 1u)) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (k < lo || k >= lo + C) x[i].v[k] = neg_inf(T{});
          }
        }
      }
    }
    const float x_y = live ? to_math(row[y]) : 0.0f;

    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (active && (mine >> i & 1u)) m = fmaxf(m, chunk_max(x[i]));
      keep_packed(x[i]);
    }
    m = cluster_reduce<CLUSTER>(row_reduce<TPR>(m, smem_max, Max{}), &slot_max, Max{});

    // (number of x == m, sum of exp(x - m) over the rest): see log_sum_exp_shifted.
    float2 ns = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (active && (mine >> i & 1u)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = to_math(x[i].v[k]) - m;
          const float e = exp2_ftz(d * kLog2e);  // computed for every element: no branch
          ns.x += d == 0.0f ? 1.0f : 0.0f;
          ns.y += d == 0.0f ? 0.0f : e;
        }
      }
      keep_packed(x[i]);
    }
    ns = cluster_reduce<CLUSTER>(row_reduce<TPR>(ns, smem_sum, Add2{}), &slot_sum, Add2{});

    // The row's scalars, the same in every thread of the row (and every CTA of its cluster).
    const float s = ns.x + ns.y;
    const float log_s = log_sum_exp_shifted(ns.x, ns.y);
    const float lp_y = live ? (x_y - m) - log_s : 0.0f;
    const float gamma = launch_gamma(p, ck_exp(lp_y));
    const FocalTerms<float> ty = focal_terms(lp_y, ck_exp(lp_y), gamma);
    const float w_y = live && w != nullptr ? w[y] : 1.0f;
    const float aG_y = w_y * ty.G;
    const bool poisoned = poisoned_max(m);  // as torch: x - max is inf - inf
    const float S = poisoned ? NAN : aG_y;
    const float g_y = poisoned ? NAN : true_class_grad(ty, 0.0f, aG_y);
    const float scale = live ? scale_all : 0.0f;
    const float row_loss = !active || ignored ? 0.0f : (bad || poisoned ? NAN : -(w_y * ty.f));
    if (lane == 0 && rank == 0) {
      if (active && p.reduction == ReductionKind::None) {
        store_value(p.loss, row_i, p.out_dtype, row_loss);
      }
      smem_loss[group] = active ? static_cast<double>(row_loss) : 0.0;
      if (active && p.stats != nullptr) {
        float* o = static_cast<float*>(p.stats) + row_i * kRowStats;
        o[0] = m; o[1] = s; o[2] = log_s; o[3] = gamma; o[4] = S; o[5] = g_y; o[6] = scale;
      }
    }

    // The gradient for grad_output = 1 from the registers: c p_j, then the true class.
    if (p.grad != nullptr && active) {
      T* grow = static_cast<T*>(p.grad) + e0;  // no __restrict__: y is stored through both
      Chunk* grad_chunks = reinterpret_cast<Chunk*>(grow - rc.head) + rc.first;
      const auto store = [&](int i, const Chunk& g) {
        if (ALIGNED || !(shared >> i & 1u)) {
          grad_chunks[i * TPR] = g;
        } else {  // only this row's elements
          const int lo = rc.lo(i);
          T* e = reinterpret_cast<T*>(grad_chunks + i * TPR);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (k >= lo && k < lo + C) e[k] = g.v[k];
          }
        }
      };
      if (live) {
        const float coef = S * scale / s;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if (mine >> i & 1u) {
            Chunk g;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              g.v[k] = from_math<T>(ck_exp(to_math(x[i].v[k]) - m) * coef);
            }
            store(i, g);
          }
        }
        // The thread that wrote y's chunk overwrites y (program order keeps its store last).
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if ((mine >> i & 1u) && static_cast<unsigned>(y + rc.lo(i)) < VEC) {
            grow[y] = from_math<T>(g_y * scale);
          }
        }
      } else {  // an ignored sample: 0; an out-of-range target: NaN
        Chunk g;
#pragma unroll
        for (int k = 0; k < VEC; ++k) g.v[k] = from_math<T>(bad ? NAN : 0.0f);
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          if (mine >> i & 1u) store(i, g);
        }
      }
    }
    if (p.reduction != ReductionKind::None) {
      if constexpr (ROWS > 1) __syncthreads();
      if (threadIdx.x == 0 && rank == 0) {  // a cluster's row is its rank 0's
        for (int j = 0; j < ROWS; ++j) block_loss += smem_loss[j];
      }
      if constexpr (ROWS > 1) __syncthreads();
    }
  }
  if constexpr (CLUSTER > 1) cluster_sync_all();  // no CTA leaves while its slots may be read
  if (p.reduction != ReductionKind::None) {
    finish_reduced_loss(p, threadIdx.x == 0 ? block_loss : 0.0);
  }
}

// Launch configuration of the cluster kernels (CLUSTER > 1).
cudaLaunchConfig_t cluster_config(unsigned grid, int cluster, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kClusterThreads);
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = cluster;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Whether this device runs the cluster kernel of T and CLUSTER: cluster launch supported, the
// kernel's code built for sm_90 or later (an sm_80-only build has no clusters), and a cluster
// fits on the device. Asked once per device (host-side queries, no synchronisation).
template <typename T, int CLUSTER, bool ALIGNED>
bool cluster_ready() {
  constexpr int kDevices = 64;
  static std::atomic<signed char> known[kDevices];  // 0: not asked yet, 1: yes, -1: no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (dev < 0 || dev >= kDevices) return false;
  signed char state = known[dev].load(std::memory_order_relaxed);
  if (state == 0) {
    auto kernel =
        focal_loss_sparse_forward_kernel<T, kClusterThreads, cluster_items(ALIGNED), CLUSTER,
                                         ALIGNED>;
    int supported = 0, clusters = 0;
    cudaFuncAttributes attrs{};
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(CLUSTER, CLUSTER, 0, &attr);
    // ptxVersion: the architecture the kernel's body was compiled for (__CUDA_ARCH__); an
    // sm_80 build JIT-compiled on an H100 has binaryVersion 90 but the body without clusters.
    cudaError_t err = cudaDeviceGetAttribute(&supported, cudaDevAttrClusterLaunch, dev);
    bool ok = err == cudaSuccess && supported;
    if (ok) {
      err = cudaFuncGetAttributes(&attrs, kernel);
      ok = err == cudaSuccess && attrs.ptxVersion >= 90 && attrs.binaryVersion >= 90;
    }
    if (ok) {
      err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
      ok = err == cudaSuccess && clusters > 0;
    }
    // a refused query leaves no error behind; when every query succeeds, an error pending from
    // earlier work stays pending for its owner's check
    if (err != cudaSuccess) cudaGetLastError();
    // The first answer stays: the partials' size and the launch must see the same layout.
    signed char unknown = 0;
    known[dev].compare_exchange_strong(unknown, ok ? 1 : -1);
    state = known[dev].load();
  }
  return state > 0;
}

// Threads a row (tpr), 16-byte chunks a thread (items) and CTAs a row (cluster) by row length:
// the most chunks a row spans (one more where rows share chunks). Rows that share chunks keep at
// most 4 a thread (cluster_items).
template <typename T>
RowLayout sparse_layout(const FocalLossLaunch& p) {
  if (p.probs != nullptr || p.target == nullptr || p.smoothing != 0.0 || !p.bases_aligned ||
      p.n_classes > INT_MAX / 2) {
    return {};
  }
  constexpr int vec = 16 / sizeof(T);
  const bool aligned = p.vectorized;
  const int64_t chunks = aligned ? p.n_classes / vec : (p.n_classes + 2 * vec - 2) / vec;
  const int items = cluster_items(aligned), per_cta = kClusterThreads * items;
  if (chunks <= per_cta / 2) return register_row_layout(chunks);  // rows a warp, a block
  const int cluster = pow2_at_least((chunks + per_cta - 1) / per_cta);  // a row a cluster (sm_90)
  if (cluster == 1) return {kClusterThreads, items, 1};
  const auto ready = [&](auto a) {
    constexpr bool A = decltype(a)::value;
    return cluster == 2 ? cluster_ready<T, 2, A>()
           : cluster == 4 ? cluster_ready<T, 4, A>()
           : cluster == 8 && cluster_ready<T, 8, A>();
  };
  const bool ok = aligned ? ready(std::true_type{}) : ready(std::false_type{});
  return ok ? RowLayout{kClusterThreads, items, cluster} : RowLayout{};
}

template <typename T, int TPR, int ITEMS, int CLUSTER>
unsigned sparse_grid(const FocalLossLaunch& p) {
  constexpr int rows = threads_of(TPR) / TPR;
  int64_t groups = (p.n_rows + rows - 1) / rows;
  groups = groups < 1 ? 1 : groups > INT_MAX / CLUSTER ? INT_MAX / CLUSTER : groups;
  return static_cast<unsigned>(groups * CLUSTER);
}

// Calls f with the kernel's template arguments (tpr, items, cluster, aligned) for the launch's
// sparse_layout (false if the launch is not this path's).
template <typename T, typename F>
bool with_layout(const FocalLossLaunch& p, F&& f) {
  using std::integral_constant;
  using I1 = integral_constant<int, 1>;
  using Big = integral_constant<int, kClusterThreads>;
  const RowLayout l = sparse_layout<T>(p);
  const auto run = [&](auto aligned) {
    using Items = integral_constant<int, cluster_items(aligned.value)>;
    if (l.tpr == kClusterThreads && l.items == Items::value) {
      switch (l.cluster) {
        case 1: return f(Big{}, Items{}, I1{}, aligned), true;
        case 2: return f(Big{}, Items{}, integral_constant<int, 2>{}, aligned), true;
        case 4: return f(Big{}, Items{}, integral_constant<int, 4>{}, aligned), true;
        case 8: return f(Big{}, Items{}, integral_constant<int, 8>{}, aligned), true;
      }
      return false;
    }
    bool launched = false;  // (rows that share chunks: sparse_layout gives at most 4 a thread)
    with_register_layout(l, [&](auto tpr, auto items) {
      if constexpr (items.value <= Items::value) {
        f(tpr, items, I1{}, aligned);
        launched = true;
      }
    });
    return launched;
  };
  return p.vectorized ? run(std::true_type{}) : run(std::false_type{});
}

template <typename F>
bool with_sparse_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float16: return f(__half{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float64: return false;  // the general kernel: math in double
  }
  return false;
}

}  // namespace

int64_t focal_loss_sparse_blocks(const FocalLossLaunch& p) {
  int64_t blocks = 0;
  with_sparse_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_layout<T>(p, [&](auto tpr, auto items, auto cluster, auto) {
      blocks = sparse_grid<T, tpr.value, items.value, cluster.value>(p);
    });
  });
  return blocks;
}

bool launch_focal_loss_sparse_forward(const FocalLossLaunch& p, cudaStream_t stream,
                                      cudaError_t* err) {
  return with_sparse_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_layout<T>(p, [&](auto tpr, auto items, auto cluster, auto aligned) {
      constexpr int TPR = tpr.value, ITEMS = items.value, CLUSTER = cluster.value;
      auto kernel = focal_loss_sparse_forward_kernel<T, TPR, ITEMS, CLUSTER, aligned.value>;
      const unsigned grid = sparse_grid<T, TPR, ITEMS, CLUSTER>(p);
      if constexpr (CLUSTER == 1) {
        kernel<<<grid, threads_of(TPR), 0, stream>>>(p);
        *err = cudaGetLastError();
      } else {
        cudaLaunchAttribute attr;
        const cudaLaunchConfig_t cfg = cluster_config(grid, CLUSTER, stream, &attr);
        *err = cudaLaunchKernelEx(&cfg, kernel, p);
      }
    });
  });
}

}  // namespace calibkernels
