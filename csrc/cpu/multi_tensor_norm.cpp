// dlopt_C::multi_tensor_norm on the CPU: the vector norm of every tensor of a list
// and the total norm, in one pass over memory.
//
// One parallel region over 32K-element chunks of all tensors (for_each_chunk); each
// chunk reduces to one partial in double (L1/L2 of fp32/bf16/fp16 inputs: fp32 sums
// of 8 terms widened to double, see reduce_chunk; other norms widen first), written to its own
// slot. The partials are then combined per tensor, in chunk order, on one thread: the
// result does not depend on the number of threads. The maths is norm_math.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/norm_math.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct F64 {
  using T = double;
  static inline double load(double x) { return x; }
};

using ChunkFn = double (*)(const void*, int64_t, int64_t, double);

// One chunk [begin, end) of a tensor stored as S, reduced to a raw partial. The max /
// min loops carry OpenMP simd reductions (the compiler may then vectorize them).
template <class S, NormKind K>
double reduce_chunk(const void* data, int64_t begin, int64_t end, double p) {
  const auto* __restrict__ x = static_cast<const typename S::T*>(data);
  if constexpr (K == NormKind::kInf || K == NormKind::kNegInf) {
    using V = decltype(S::load(x[0]));
    V m = norm_identity<V>(K);
    int64_t nans = 0;
    if constexpr (K == NormKind::kInf) {
#pragma omp simd reduction(max : m) reduction(+ : nans)
      for (int64_t i = begin; i < end; ++i) {
        const V a = std::fabs(S::load(x[i]));
        m = a > m ? a : m;
        nans += a != a;
      }
    } else {
#pragma omp simd reduction(min : m) reduction(+ : nans)
      for (int64_t i = begin; i < end; ++i) {
        const V a = std::fabs(S::load(x[i]));
        m = a < m ? a : m;
        nans += a != a;
      }
    }
    return nans ? static_cast<double>(NAN) : static_cast<double>(m);
  } else if constexpr (K == NormKind::kP) {
    double acc = 0.0;
    for (int64_t i = begin; i < end; ++i)
      acc += norm_term<double>(K, static_cast<double>(S::load(x[i])), p);
    return acc;
  } else {
    if constexpr (!std::is_same_v<S, F64> && (K == NormKind::kL2 || K == NormKind::kL1)) {
      // fp32 partial sums of 8 terms per lane, widened to double every 128 elements:
      // widening every element first made this loop compute-bound (it reached ~65% of
      // the memory bandwidth). Each partial carries at most 7 fp32 roundings (~4e-7
      // relative). A non-finite result (a square above FLT_MAX, an inf or a NaN) redoes
      // the chunk in double below, so huge finite inputs still give a finite norm.
      //
      // The chunk is read as two streams at once (its halves, each prefetched ahead):
      // a single read stream per core left the norm well below the bandwidth a step's
      // several streams reach on the CI-like VM. Each 8-term partial takes 4 rows of
      // 16 from each half, so the order of the sums is fixed by the chunk alone.
      constexpr int kLanes = 16, kRows = 8, kHalfRows = kRows / 2;
      constexpr int64_t kHalfStep = kLanes * kHalfRows;
      double wide[kLanes] = {};
      const int64_t half = (end - begin) / (2 * kHalfStep) * kHalfStep;
      for (int64_t o = 0; o < half; o += kHalfStep) {
        const int64_t a = begin + o, b = begin + half + o;
        prefetch_block<kHalfStep>(x, a);
        prefetch_block<kHalfStep>(x, b);
        float part[kLanes] = {};
        for (int r = 0; r < kHalfRows; ++r)
#pragma omp simd
          for (int j = 0; j < kLanes; ++j)
            part[j] += norm_term<float>(K, S::load(x[a + r * kLanes + j]), 0.f);
        for (int r = 0; r < kHalfRows; ++r)
#pragma omp simd
          for (int j = 0; j < kLanes; ++j)
            part[j] += norm_term<float>(K, S::load(x[b + r * kLanes + j]), 0.f);
        for (int j = 0; j < kLanes; ++j) wide[j] += part[j];
      }
      int64_t i = begin + 2 * half;
      for (; i + kLanes * kRows <= end; i += kLanes * kRows) {
        float part[kLanes] = {};
        for (int r = 0; r < kRows; ++r)
#pragma omp simd
          for (int j = 0; j < kLanes; ++j)
            part[j] += norm_term<float>(K, S::load(x[i + r * kLanes + j]), 0.f);
        for (int j = 0; j < kLanes; ++j) wide[j] += part[j];
      }
      double acc = 0.0;
      for (; i < end; ++i) acc += norm_term<double>(K, static_cast<double>(S::load(x[i])), p);
      for (int j = 0; j < kLanes; ++j) acc += wide[j];
      if (std::isfinite(acc)) return acc;
    }
    // 16 independent double lanes (several vector accumulators, so the adds do not
    // wait on each other), summed in a fixed order at the end.
    constexpr int kLanes = 16;
    double lanes[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes)
#pragma omp simd
      for (int j = 0; j < kLanes; ++j)
        lanes[j] += norm_term<double>(K, static_cast<double>(S::load(x[i + j])), p);
    double acc = 0.0;
    for (; i < end; ++i) acc += norm_term<double>(K, static_cast<double>(S::load(x[i])), p);
    for (int j = 0; j < kLanes; ++j) acc += lanes[j];
    return acc;
  }
}

template <class S>
ChunkFn pick_kind(NormKind k) {
  switch (k) {
    case NormKind::kL2: return &reduce_chunk<S, NormKind::kL2>;
    case NormKind::kL1: return &reduce_chunk<S, NormKind::kL1>;
    case NormKind::kInf: return &reduce_chunk<S, NormKind::kInf>;
    case NormKind::kNegInf: return &reduce_chunk<S, NormKind::kNegInf>;
    case NormKind::kL0: return &reduce_chunk<S, NormKind::kL0>;
    default: return &reduce_chunk<S, NormKind::kP>;
  }
}

ChunkFn pick_chunk_fn(at::ScalarType dt, NormKind k, size_t i) {
  switch (dt) {
    case at::kFloat: return pick_kind<F32>(k);
    case at::kBFloat16: return pick_kind<BF16>(k);
    case at::kHalf: return pick_kind<F16>(k);
    case at::kDouble: return pick_kind<F64>(k);
    default:
      TORCH_CHECK(false, "dlopt::multi_tensor_norm: tensors[", i, "] has dtype ", dt,
                  "; float32, bfloat16, float16 or float64 only");
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors,
                                                         double norm_type) {
  const size_t n = tensors.size();
  const NormKind kind = norm_kind(norm_type);
  std::vector<ChunkFn> fns(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "dlopt::multi_tensor_norm (cpu): tensors[", i,
                "] is on ", tensors[i].device());
    fns[i] = pick_chunk_fn(tensors[i].scalar_type(), kind, i);
  }
  // Only dense tensors are walked as flat memory; others get a contiguous copy.
  AlignedLists L({tensors}, {false});

  std::vector<int64_t> numels(n), chunk_base(n + 1, 0);
  std::vector<const void*> data(n);
  for (size_t i = 0; i < n; ++i) {
    numels[i] = L[0][i].numel();
    data[i] = numels[i] ? L[0][i].const_data_ptr() : nullptr;
    chunk_base[i + 1] = chunk_base[i] + (numels[i] + kCpuChunk - 1) / kCpuChunk;
  }
  std::vector<double> partials(static_cast<size_t>(chunk_base[n]));
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) {
    partials[chunk_base[t] + b / kCpuChunk] = fns[t](data[t], b, e, norm_type);
  });

  at::Tensor norms = at::empty({static_cast<int64_t>(n)}, at::dtype(at::kFloat));
  at::Tensor total = at::empty({}, at::dtype(at::kFloat));
  float* out = norms.data_ptr<float>();
  double acc_total = norm_identity<double>(kind);
  for (size_t i = 0; i < n; ++i) {
    double raw = norm_identity<double>(kind);
    for (int64_t c = chunk_base[i]; c < chunk_base[i + 1]; ++c)
      raw = norm_combine(kind, raw, partials[c]);
    out[i] = static_cast<float>(norm_finish(kind, raw, norm_type));
    acc_total = norm_total_add(kind, acc_total, raw);
  }
  *total.data_ptr<float>() = static_cast<float>(norm_total_finish(kind, acc_total, norm_type));
  return {norms, total};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cpu); }

}  // namespace dlopt
