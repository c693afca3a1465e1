// Multi-tensor reductions on CUDA (norms of many tensors, LAMB's per-tensor norms),
// built on multi_tensor_apply.cuh: the same tables, chunking, vectorized loads and
// stores, plus a per-chunk result. Deterministic: no atomics, a fixed order.
//
//   1. multi_tensor_reduce(entries, op, stream): like multi_tensor_apply (the functor may
//      also write lists), but every thread keeps `float acc[Op::kPartials]`, passed
//      to the functor as its fourth argument; each block (one chunk of one tensor)
//      reduces its threads' values in double and writes them to
//      op.partials[(meta.chunk_base + chunk) * kPartials + r]. A tensor's chunks
//      are thus contiguous: give tensor i `chunk_base` = sum of chunks_of(numel)
//      over the tensors before it (chunk_bases() below).
//   2. segment_reduce(bases, partials, fin, stream): one block per tensor combines its
//      chunks' partials in double and calls fin.finish(tensor_index, values) once.
//      The tensor ranges travel by value in the kernel argument (no host->device
//      copy, nothing that breaks CUDA graph capture), 448 tensors per launch.
//
// A reducing Op (in addition to multi_tensor_apply's interface) provides
//   static constexpr int kPartials;                       // R
//   Meta with an int64_t `chunk_base` member;
//   double* partials;                                     // R doubles per chunk
//   float identity(int r) const;                          // start value
//   double combine(double a, double b, int r) const;      // associative
//   void operator()(float (&x)[kLists], const Block&, int64_t index,
//                   float (&acc)[kPartials]) const;
// A skipped block (begin() false) writes the identity. A finisher for
// segment_reduce provides kPartials, identity, combine and
//   void finish(int64_t tensor_index, const double (&v)[kPartials]) const;
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "dlopt/multi_tensor_apply.cuh"

namespace dlopt {
namespace mta {

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// bases[i] = first chunk of tensor i, bases[n] = total chunks.
inline std::vector<int64_t> chunk_bases(const std::vector<int64_t>& numels) {
  std::vector<int64_t> bases(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) bases[i + 1] = bases[i] + chunks_of(numels[i]);
  return bases;
}

// Reduces R doubles over the threads of a block (every thread must call it, once per
// kernel; blockDim.x a multiple of 32, at most 1024). The result is in thread 0's v.
template <int R, class C>
__device__ void block_reduce(double (&v)[R], const C& c) {
  __shared__ double warp_vals[R][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = static_cast<int>(blockDim.x >> 5);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = c.combine(v[r], __shfl_down_sync(0xffffffffu, v[r], off), r);
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < R; ++r) warp_vals[r][warp] = v[r];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = lane < nwarps ? warp_vals[r][lane] : c.identity(r);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
      for (int r = 0; r < R; ++r)
        v[r] = c.combine(v[r], __shfl_down_sync(0xffffffffu, v[r], off), r);
  }
}

#ifdef DLOPT_EMULATE
// block_reduce for a host-only build (tests/cuda_emulation): v[t] is thread t's values,
// of `nthreads` (a multiple of 32, at most 1024); the result goes to v[0]. Exactly the
// device version's order: each shuffle round reads the lane `off` above from the round
// before (ascending lanes in place read it before it changes); a lane whose source is
// past the warp keeps a value no lane that reaches lane 0 reads.
template <int R, class C>
void block_reduce_host(double (*v)[R], int nthreads, const C& c) {
  auto warp_tree = [&](double (*w)[R]) {
    for (int off = 16; off > 0; off >>= 1)
      for (int lane = 0; lane + off < 32; ++lane)
        for (int r = 0; r < R; ++r) w[lane][r] = c.combine(w[lane][r], w[lane + off][r], r);
  };
  const int nwarps = nthreads >> 5;
  double warp_vals[32][R];
  for (int w = 0; w < nwarps; ++w) {
    warp_tree(v + 32 * w);
    for (int r = 0; r < R; ++r) warp_vals[w][r] = v[32 * w][r];
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int r = 0; r < R; ++r) v[lane][r] = lane < nwarps ? warp_vals[lane][r] : c.identity(r);
  warp_tree(v);
}
#endif

// One thread's part of a reducing launch: its values, reduced over the elements it
// visits (run_thread), widened to double for block_reduce.
template <class Op, int BYTES>
DLOPT_HD void reduce_thread(const Table<Op, BYTES>& tab, int block, int thread, int nthreads,
                            double (&v)[Op::kPartials]) {
  constexpr int R = Op::kPartials;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = tab.op.identity(r);
  run_thread(tab, block, thread, nthreads, acc);
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = acc[r];
}

// Thread 0's end of a block: its chunk's reduced values into the partials.
template <class Op, int BYTES>
DLOPT_HD void write_partials(const Table<Op, BYTES>& tab, int block,
                             const double (&v)[Op::kPartials]) {
  constexpr int R = Op::kPartials;
  int slot = 0, chunk = 0;
  locate(tab, block, slot, chunk);
  const int64_t c = tab.meta[slot].chunk_base + chunk;
#pragma unroll
  for (int r = 0; r < R; ++r) tab.op.partials[c * R + r] = v[r];
}

template <class Op, int BYTES>
__global__ void __launch_bounds__(kBlockSize, 2)
    multi_tensor_reduce_kernel(const __grid_constant__ Table<Op, BYTES> tab) {
  double v[Op::kPartials];
  reduce_thread(tab, blockIdx.x, threadIdx.x, blockDim.x, v);
  block_reduce<Op::kPartials>(v, tab.op);
  if (threadIdx.x == 0) write_partials(tab, blockIdx.x, v);
}

#ifdef DLOPT_EMULATE
// A reducing launch on the host: every thread of each block, then the block's reduction.
template <class Tab>
void emulate_reduce_blocks(const Tab& tab, int blocks) {
  using Op = std::decay_t<decltype(tab.op)>;
  auto v = std::make_unique<double[][Op::kPartials]>(kBlockSize);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < kBlockSize; ++t) reduce_thread(tab, b, t, kBlockSize, v[t]);
    block_reduce_host<Op::kPartials>(v.get(), kBlockSize, tab.op);
    write_partials(tab, b, v[0]);
  }
}
#endif

// Launches a reducing Op over every entry on `stream` (of the current device). Empty
// tensors are skipped (they own no chunk). Returns the first launch error.
template <class Op>
cudaError_t multi_tensor_reduce(
    const std::vector<TensorEntry<Op::kLists, typename Op::Meta>>& entries, const Op& op,
    cudaStream_t stream) {
  // kChunk chunks always: the ops size their partials by chunk_bases() before the call;
  // a block's partial goes to its chunk's slot whatever table carried it (4 KB or 32 KB:
  // launch_call)
  return launch_call(entries, op, kChunk, [&](const auto& tab, int blocks) {
#ifdef DLOPT_EMULATE
    (void)stream;
    emulate_reduce_blocks(tab, blocks);
    return cudaSuccess;
#else
    constexpr int kBytes = std::decay_t<decltype(tab)>::kBytes;
    multi_tensor_reduce_kernel<Op, kBytes><<<blocks, kBlockSize, 0, stream>>>(tab);
    return cudaGetLastError();
#endif
  });
}

constexpr int kSegmentsPerLaunch = 448;
constexpr int kSegmentBlock = 256;

struct SegmentBatch {
  int64_t base[kSegmentsPerLaunch + 1];  // chunk ranges [base[k], base[k + 1])
  int64_t first;                         // tensor index of segment 0
};

// One thread's part of segment k: its share of the segment's chunks' partials.
template <class Fin>
DLOPT_HD void segment_thread(const SegmentBatch& b, const double* partials, const Fin& fin,
                             int k, int thread, int nthreads, double (&v)[Fin::kPartials]) {
  constexpr int R = Fin::kPartials;
  const int64_t lo = b.base[k], hi = b.base[k + 1];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = fin.identity(r);
  for (int64_t c = lo + thread; c < hi; c += nthreads)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = fin.combine(v[r], partials[c * R + r], r);
}

template <class Fin>
__global__ void __launch_bounds__(kSegmentBlock)
    segment_reduce_kernel(const __grid_constant__ SegmentBatch b, const double* partials,
                          const __grid_constant__ Fin fin) {
  double v[Fin::kPartials];
  segment_thread(b, partials, fin, blockIdx.x, threadIdx.x, blockDim.x, v);
  block_reduce<Fin::kPartials>(v, fin);
  if (threadIdx.x == 0) fin.finish(b.first + blockIdx.x, v);
}

// fin.finish(i, values of tensor i) for every tensor i, bases from chunk_bases(), on
// `stream`. Returns the first launch error.
template <class Fin>
cudaError_t segment_reduce(const std::vector<int64_t>& bases, const double* partials,
                           const Fin& fin, cudaStream_t stream) {
  static_assert(sizeof(SegmentBatch) + sizeof(double*) + sizeof(Fin) <= 4096,
                "segment_reduce: kernel arguments over 4 KB");
  static_assert(std::is_trivially_copyable<Fin>::value, "Fin must be trivially copyable");
  const int64_t n = static_cast<int64_t>(bases.size()) - 1;
  for (int64_t first = 0; first < n; first += kSegmentsPerLaunch) {
    const int count = static_cast<int>(std::min<int64_t>(kSegmentsPerLaunch, n - first));
    SegmentBatch b;
    b.first = first;
    for (int k = 0; k <= count; ++k) b.base[k] = bases[first + k];
#ifdef DLOPT_EMULATE
    auto v = std::make_unique<double[][Fin::kPartials]>(kSegmentBlock);
    for (int k = 0; k < count; ++k) {
      for (int t = 0; t < kSegmentBlock; ++t)
        segment_thread(b, partials, fin, k, t, kSegmentBlock, v[t]);
      block_reduce_host<Fin::kPartials>(v.get(), kSegmentBlock, fin);
      fin.finish(b.first + k, v[0]);
    }
    (void)stream;
#else
    segment_reduce_kernel<Fin><<<count, kSegmentBlock, 0, stream>>>(b, partials, fin);
    DLOPT_CUDA_TRY(cudaGetLastError());
#endif
  }
  return cudaSuccess;
}

}  // namespace mta
}  // namespace dlopt
