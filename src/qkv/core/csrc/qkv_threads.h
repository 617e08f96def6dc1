// How the qkv kernels (decode_kernel.cpp, flash_bwd_kernel.cpp) spread a call over threads: each of
// nthreads threads runs worker(t), t = 0 .. nthreads - 1, on torch's own OpenMP runtime where the
// compiler has OpenMP (libgomp is already loaded by torch and the loader reuses it, so the kernel
// runs on the threads torch's operators use), else on std::thread (t = 0 is the calling thread).
// The kernel cache (qkv/core/_kernels.py) hashes this header with each kernel that includes it.
#pragma once
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

template <class Worker>
inline void on_threads(int nthreads, const Worker& worker) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
  worker(omp_get_thread_num());
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < nthreads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
#endif
}

}  // namespace
