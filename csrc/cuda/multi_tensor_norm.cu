// dlopt_C::multi_tensor_norm on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in multi_tensor_norm_host.cpp (g++), semantics as
// csrc/cpu/multi_tensor_norm.cpp.
//
// Three steps on the current stream, none of which waits for the host (so a caller
// can capture it in a CUDA graph):
//   1. multi_tensor_reduce with NormOp, one launch series per input dtype: each
//      block reduces one 64K-element chunk (fp32 terms, fp32 per thread, double
//      across the block) to a double partial.
//   2. segment_reduce: one block per tensor combines its chunks' partials into the
//      tensor's raw value and norm.
//   3. norm_total_kernel, one block: the total from the raw values.
// The maths is dlopt/norm_math.h; the order of every reduction is fixed.
#include <algorithm>
#include <vector>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/multi_tensor_reduce.cuh"
#include "dlopt/norm_math.h"

namespace dlopt {
namespace {

// float64 inputs are read and reduced in fp32 like the others.
struct F64 {
  using T = double;
  DLOPT_HD static float load(double x) { return static_cast<float>(x); }
};

struct NormMeta {
  int64_t chunk_base;
};

struct NormReduce {
  NormKind kind;
  DLOPT_HD float identity(int) const { return norm_identity<float>(kind); }
  DLOPT_HD double combine(double a, double b, int) const { return norm_combine(kind, a, b); }
};

template <class S>
struct NormOp : NormReduce {
  static constexpr int kLists = 1;
  static constexpr int kPartials = 1;
  template <int K>
  using List = mta::Access<S, mta::kRead>;
  using Meta = NormMeta;
  struct Block {};
  double* partials;
  float p;

  DLOPT_HD bool begin(const Meta&, Block&) const { return true; }
  DLOPT_HD void operator()(float (&x)[kLists], const Block&, int64_t,
                           float (&acc)[kPartials]) const {
    acc[0] = norm_combine(kind, acc[0], norm_term<float>(kind, x[0], p));
  }
};

struct NormFinish : NormReduce {
  static constexpr int kPartials = 1;
  double* raw;
  float* norms;
  double ord;
  DLOPT_HD void finish(int64_t i, const double (&v)[kPartials]) const {
    raw[i] = v[0];
    norms[i] = static_cast<float>(norm_finish(kind, v[0], ord));
  }
};

constexpr int kTotalBlock = 512;

// One thread's share of the total: the raw values i = thread, thread + nthreads, ...
DLOPT_HD void norm_total_thread(const double* raw, int64_t n, const NormReduce& red, int thread,
                                int nthreads, double (&v)[1]) {
  v[0] = norm_identity<double>(red.kind);
  for (int64_t i = thread; i < n; i += nthreads) v[0] = norm_total_add(red.kind, v[0], raw[i]);
}

__global__ void __launch_bounds__(kTotalBlock)
    norm_total_kernel(const double* raw, int64_t n, float* total, NormReduce red, double ord) {
  double v[1];
  norm_total_thread(raw, n, red, threadIdx.x, blockDim.x, v);
  mta::block_reduce<1>(v, red);  // partial counts (kL0) add up like sums
  if (threadIdx.x == 0) *total = static_cast<float>(norm_total_finish(red.kind, v[0], ord));
}

using Entries = std::vector<mta::TensorEntry<1, NormMeta>>;

template <class S>
cudaError_t launch(const Entries& entries, NormKind kind, double* partials, double ord,
                   cudaStream_t stream) {
  NormOp<S> op;
  op.kind = kind;
  op.partials = partials;
  op.p = static_cast<float>(ord);
  return mta::multi_tensor_reduce(entries, op, stream);
}

}  // namespace

namespace cuda {

cudaError_t launch_multi_tensor_norm(const Launch& l, double norm_type, float* norms,
                                     float* total) {
  const NormKind kind = norm_kind(norm_type);
  std::vector<int64_t> numels(l.n);
  for (int32_t i = 0; i < l.n; ++i) numels[i] = l.entries[i].numel;
  const std::vector<int64_t> bases = mta::chunk_bases(numels);
  auto* partials =
      static_cast<double*>(l.scratch.get(std::max<int64_t>(bases[l.n], 1) * sizeof(double)));
  auto* raw = static_cast<double*>(l.scratch.get(l.n * sizeof(double)));
  if (partials == nullptr || raw == nullptr) return cudaErrorMemoryAllocation;

  auto meta = [&](const ParamEntry& e) { return NormMeta{bases[e.index]}; };
  for (const auto& [key, entries] : mta::group_by_dtype<1, NormMeta>(l, meta)) {
    cudaError_t err = cudaErrorInvalidValue;  // the host half allows only these four
    switch (key.first) {
      case DType::kF32: err = launch<F32>(entries, kind, partials, norm_type, l.stream); break;
      case DType::kBF16: err = launch<BF16>(entries, kind, partials, norm_type, l.stream); break;
      case DType::kF16: err = launch<F16>(entries, kind, partials, norm_type, l.stream); break;
      case DType::kF64: err = launch<F64>(entries, kind, partials, norm_type, l.stream); break;
      default: break;
    }
    DLOPT_CUDA_TRY(err);
  }
  NormFinish fin;
  fin.kind = kind;
  fin.raw = raw;
  fin.norms = norms;
  fin.ord = norm_type;
  DLOPT_CUDA_TRY(mta::segment_reduce(bases, partials, fin, l.stream));
#ifdef DLOPT_EMULATE  // a host-only build (multi_tensor_reduce.cuh block_reduce_host)
  double v[kTotalBlock][1];
  for (int t = 0; t < kTotalBlock; ++t) norm_total_thread(raw, l.n, NormReduce{kind}, t, kTotalBlock, v[t]);
  mta::block_reduce_host<1>(v, kTotalBlock, NormReduce{kind});
  *total = static_cast<float>(norm_total_finish(kind, v[0][0], norm_type));
  return cudaSuccess;
#else
  norm_total_kernel<<<1, kTotalBlock, 0, l.stream>>>(raw, l.n, total, NormReduce{kind}, norm_type);
  return cudaGetLastError();
#endif
}

}  // namespace cuda
}  // namespace dlopt
