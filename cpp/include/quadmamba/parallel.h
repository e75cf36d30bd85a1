// One parallel loop for the whole core. With OpenMP it uses the process's
// OpenMP runtime (the same libgomp that PyTorch's CPU build loads, so
// torch.set_num_threads governs it); without OpenMP it falls back to
// std::thread workers: as many as set_num_threads asked for (the Python layer
// passes torch.get_num_threads() before each kernel call), else one per
// hardware thread.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#if defined(QUADMAMBA_WITH_OPENMP)
#include <omp.h>
#endif

namespace quadmamba {

// The worker count of builds without OpenMP (0: one per hardware thread).
inline std::atomic<int>& thread_limit() {
  static std::atomic<int> limit{0};
  return limit;
}

// Sets the worker count of builds without OpenMP (n <= 0: one per hardware thread).
// OpenMP builds follow their runtime's setting (omp_set_num_threads, which
// torch.set_num_threads calls when the runtime is shared) and ignore this.
inline void set_num_threads(int n) { thread_limit().store(std::max(n, 0), std::memory_order_relaxed); }

inline int num_threads() {
#if defined(QUADMAMBA_WITH_OPENMP)
  return omp_get_max_threads();
#else
  const int limit = thread_limit().load(std::memory_order_relaxed);
  return limit > 0 ? limit : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#endif
}

// Calls f(lo, hi) on disjoint sub-ranges covering [begin, end). Ranges are at
// least `grain` long (except the last); runs inline when one range suffices or
// when already inside a parallel region. Exceptions thrown by f are rethrown.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t max_chunks = (n + grain - 1) / grain;
#if defined(QUADMAMBA_WITH_OPENMP)
  const int64_t threads = std::min<int64_t>(num_threads(), max_chunks);
  if (threads <= 1 || omp_in_parallel()) {
    f(begin, end);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t chunk = std::max(grain, (n + nt - 1) / nt);
    const int64_t lo = begin + tid * chunk;
    const int64_t hi = std::min(end, lo + chunk);
    if (lo < hi) {
      try {
        f(lo, hi);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  const int64_t threads = std::min<int64_t>(num_threads(), max_chunks);
  if (threads <= 1) {
    f(begin, end);
    return;
  }
  const int64_t chunk = std::max(grain, (n + threads - 1) / threads);
  std::exception_ptr error;
  std::mutex error_mutex;
  const int64_t chunks = (n + chunk - 1) / chunk;  // non-empty chunks, at most `threads`
  // Chunk t: [begin + t * chunk, min(end, begin + (t + 1) * chunk)).
  auto run = [&](int64_t t) {
    const int64_t lo = begin + t * chunk;
    try {
      f(lo, std::min(end, lo + chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  // Chunk 0 runs on the calling thread, the others on workers; a worker that cannot be started
  // (a thread or memory limit) leaves its chunk and the later ones to the calling thread.
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(chunks));   // (a failure here starts nothing and propagates)
  int64_t started = 1;
  for (; started < chunks; ++started) {
    try {
      workers.emplace_back(run, started);
    } catch (...) {
      break;
    }
  }
  run(0);
  for (int64_t t = started; t < chunks; ++t) run(t);
  for (auto& w : workers) w.join();
  if (error) std::rethrow_exception(error);
#endif
}

}  // namespace quadmamba
