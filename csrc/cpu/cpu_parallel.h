// Row-parallel loops for the CPU kernels.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "csrc/cpu/ is compiled once per CPU capability, with -DCPU_CAPABILITY=..."
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace calibkernels {
namespace CPU_CAPABILITY {  // one copy per instruction set (cpu/kernels.h)

// f(begin, end) over the rows [0, n_rows) of row_len values each, in chunks of 64 Ki values.
// Each thread walks its own contiguous share in order, then helps finish the others': on a
// shared machine one slowed core no longer holds the whole op back (a static split waits for
// it), and every row is still computed exactly once, by the same math. Inputs below
// 32768 values (at::internal::GRAIN_SIZE) stay on one thread, as at::parallel_for keeps them.
template <typename F>
void parallel_rows(int64_t n_rows, int64_t row_len, const F& f) {
  const int64_t len = std::max<int64_t>(1, row_len);
  const int64_t serial_below = std::max<int64_t>(1, 32768 / len);
  const int64_t chunk = std::max<int64_t>(16, (int64_t(1) << 16) / len);
  const int64_t n_chunks = (n_rows + chunk - 1) / chunk;
  const int64_t T = std::min<int64_t>(at::get_num_threads(), n_chunks);
  if (n_rows < serial_below || T <= 1 || at::in_parallel_region()) return f(0, n_rows);
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[T]);
  for (int64_t s = 0; s < T; ++s) next[s].store(s * n_chunks / T);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < T; ++k) {
        const int64_t s = (t + k) % T, stop = (s + 1) * n_chunks / T;
        for (int64_t j; (j = next[s].fetch_add(1, std::memory_order_relaxed)) < stop;) {
          f(j * chunk, std::min(n_rows, (j + 1) * chunk));
        }
      }
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace calibkernels
