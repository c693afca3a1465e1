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

template <class Op, int BYTES>
__global__ void __launch_bounds__(kBlockSize, 2)
    multi_tensor_reduce_kernel(const __grid_constant__ Table<Op, BYTES> tab) {
  constexpr int R = Op::kPartials;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = tab.op.identity(r);
  run_thread(tab, blockIdx.x, threadIdx.x, blockDim.x, acc);
  double v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = acc[r];
  block_reduce<R>(v, tab.op);
  if (threadIdx.x == 0) {
    int slot = 0, chunk = 0;
    locate(tab, blockIdx.x, slot, chunk);
    const int64_t c = tab.meta[slot].chunk_base + chunk;
#pragma unroll
    for (int r = 0; r < R; ++r) tab.op.partials[c * R + r] = v[r];
  }
}

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
    constexpr int kBytes = std::decay_t<decltype(tab)>::kBytes;
    multi_tensor_reduce_kernel<Op, kBytes><<<blocks, kBlockSize, 0, stream>>>(tab);
    return cudaGetLastError();
  });
}

constexpr int kSegmentsPerLaunch = 448;
constexpr int kSegmentBlock = 256;

struct SegmentBatch {
  int64_t base[kSegmentsPerLaunch + 1];  // chunk ranges [base[k], base[k + 1])
  int64_t first;                         // tensor index of segment 0
};

template <class Fin>
__global__ void __launch_bounds__(kSegmentBlock)
    segment_reduce_kernel(const __grid_constant__ SegmentBatch b, const double* partials,
                          const __grid_constant__ Fin fin) {
  constexpr int R = Fin::kPartials;
  const int k = blockIdx.x;
  const int64_t lo = b.base[k], hi = b.base[k + 1];
  double v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = fin.identity(r);
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x)
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = fin.combine(v[r], partials[c * R + r], r);
  block_reduce<R>(v, fin);
  if (threadIdx.x == 0) fin.finish(b.first + k, v);
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
    segment_reduce_kernel<Fin><<<count, kSegmentBlock, 0, stream>>>(b, partials, fin);
    DLOPT_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace mta
}  // namespace dlopt
