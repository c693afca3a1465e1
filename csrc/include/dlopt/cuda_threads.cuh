// A kernel's thread and block indices and the cross-thread operations it uses
// (__syncthreads, warp shuffles, atomic adds), for kernel bodies written __host__
// __device__ so that the launcher emulation can run them on the CPU unchanged. On the
// device these are the CUDA builtins. Under DLOPT_EMULATE (a host-only build,
// tests/cuda_emulation) a launch runs as one OS thread per CUDA thread of a block, each
// walking the blocks in order (`emulated_launch`): barriers stand in for __syncthreads
// and for a warp's lockstep, a function-local static for __shared__ memory (shared by
// the threads, used by one block at a time: see emulated_launch), a mutex for atomics.
// Other host code never runs a kernel body.
//
// As on the device, every thread of a block must reach each sync_block and every lane
// of a warp each shfl_down (no divergent early return before them).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dlopt/macros.h"

#ifdef DLOPT_EMULATE
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>
#endif

namespace dlopt {
namespace cuda {

#ifdef DLOPT_EMULATE
namespace emu {

struct Index {
  unsigned x = 0, y = 0;
};
inline Index grid_dim, block_dim;           // the launch being emulated
inline thread_local Index thread_idx, block_idx;

class Barrier {  // reusable: a generation count tells one round's waiters from the next
 public:
  void reset(int n) { n_ = left_ = n; }
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = gen_;
    if (--left_ == 0) {
      left_ = n_;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return gen_ != gen; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_ = 0, left_ = 0;
  long gen_ = 0;
};

inline Barrier block_barrier;
inline Barrier warp_barrier[32];
inline uint64_t warp_slots[32][32];  // one 8-byte value per lane of each warp
inline std::mutex atomic_mu;

}  // namespace emu

// Every thread of every block of a (grid_x, grid_y) x threads launch runs body(): one
// OS thread per CUDA thread, each walking the blocks in order; threads: a multiple of
// 32, at most 1024. No barrier between blocks (an empty block costs nothing): a thread
// may begin block b + 1 while others finish b. So a kernel must pass a sync_block after
// its last read of shared memory (block_sum does), else a thread of the next block
// could overwrite it first; its threads meet only at sync_block and shfl_down, which
// every thread of a block (a warp) reaches the same number of times.
template <class Body>
void emulated_launch(unsigned grid_x, unsigned grid_y, unsigned threads, const Body& body) {
  emu::grid_dim = {grid_x, grid_y};
  emu::block_dim = {threads, 1};
  emu::block_barrier.reset(static_cast<int>(threads));
  for (unsigned w = 0; w < (threads + 31) / 32; ++w) emu::warp_barrier[w].reset(32);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      emu::thread_idx = {t, 0};
      for (unsigned by = 0; by < grid_y; ++by)
        for (unsigned bx = 0; bx < grid_x; ++bx) {
          emu::block_idx = {bx, by};
          body();
        }
    });
  for (auto& th : pool) th.join();
}
#endif

DLOPT_HD unsigned thread_x() {
#if defined(__CUDA_ARCH__)
  return threadIdx.x;
#elif defined(DLOPT_EMULATE)
  return emu::thread_idx.x;
#else
  return 0;
#endif
}

DLOPT_HD unsigned block_x() {
#if defined(__CUDA_ARCH__)
  return blockIdx.x;
#elif defined(DLOPT_EMULATE)
  return emu::block_idx.x;
#else
  return 0;
#endif
}

DLOPT_HD unsigned block_y() {
#if defined(__CUDA_ARCH__)
  return blockIdx.y;
#elif defined(DLOPT_EMULATE)
  return emu::block_idx.y;
#else
  return 0;
#endif
}

DLOPT_HD unsigned grid_y() {
#if defined(__CUDA_ARCH__)
  return gridDim.y;
#elif defined(DLOPT_EMULATE)
  return emu::grid_dim.y;
#else
  return 1;
#endif
}

DLOPT_HD void sync_block() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#elif defined(DLOPT_EMULATE)
  emu::block_barrier.wait();
#endif
}

// __shfl_down_sync over a whole warp: lane l gets lane l + offset's x (its own past 31).
DLOPT_HD double shfl_down(double x, unsigned offset) {
#if defined(__CUDA_ARCH__)
  return __shfl_down_sync(0xffffffffu, x, offset);
#elif defined(DLOPT_EMULATE)
  const unsigned lane = emu::thread_idx.x % 32, warp = emu::thread_idx.x / 32;
  std::memcpy(&emu::warp_slots[warp][lane], &x, sizeof x);
  emu::warp_barrier[warp].wait();
  double r = x;
  if (lane + offset < 32) std::memcpy(&r, &emu::warp_slots[warp][lane + offset], sizeof r);
  emu::warp_barrier[warp].wait();  // nobody overwrites a slot before it is read
  return r;
#else
  (void)offset;
  return x;
#endif
}

DLOPT_HD void atomic_add(double* p, double x) {
#if defined(__CUDA_ARCH__)
  atomicAdd(p, x);
#elif defined(DLOPT_EMULATE)
  std::lock_guard<std::mutex> lock(emu::atomic_mu);
  *p += x;
#else
  *p += x;
#endif
}

}  // namespace cuda
}  // namespace dlopt
