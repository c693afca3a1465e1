// Multi-tensor LAMB step on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in optim_lamb_host.cpp (g++), semantics as csrc/cpu/optim_lamb.cpp,
// maths in dlopt/lamb_math.h. Four phases on the current stream, none of which waits
// for the host (the step can be captured in a CUDA graph):
//   1. lamb_prepare_kernel, one thread per tensor: unless found_inf is set, steps
//      += 1 in device memory (dlopt/cuda_steps.cuh) and the tensor's coefficients
//      (bias corrections, 1 / grad_scale times the global-norm clip factor, SR key).
//   2. multi_tensor_reduce with LambMomentsOp (dlopt/multi_tensor_reduce.cuh): m, v
//      updated; each block writes the sums of p^2 and u^2 of its chunk.
//   3. segment_reduce with LambTrust: per tensor, the trust ratio from its chunks'
//      sums, stored as the tensor's step scale lr * trust.
//   4. multi_tensor_apply with LambApplyOp: p -= scale * u, u recomputed from the
//      stored m, v (the same u whose norm was taken).
// lr, grad_scale, global_grad_norm, found_inf and sr_seed may live on the params' GPU
// (read by the kernels) or on the CPU (read by the host half, which needs no sync).
#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/lamb_math.h"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/multi_tensor_reduce.cuh"
#include "dlopt/rounding.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

// Per-tensor values: phase 1 writes all but `scale`, phase 3 writes `scale`.
struct LambTensorCoeffs {
  AdamCoeffs c;
  float grad_mul;  // 1 / grad_scale * clip factor
  float scale;     // lr * trust ratio
  uint32_t sr_key;
};

struct LambHyper {
  ScalarRef lr, grad_scale, global_grad_norm, found_inf, seed;
  double beta1, beta2, weight_decay, eps, max_grad_norm;
  bool bias_correction;
};
static_assert(sizeof(cuda::StepBatch) + sizeof(LambHyper) + sizeof(void*) <= 4096,
              "lamb_prepare_kernel arguments over 4 KB");

// ---- phase 1 -------------------------------------------------------------------------

DLOPT_HD void lamb_prepare_one(const cuda::StepBatch& b, const LambHyper& h,
                               LambTensorCoeffs* out, int k) {
  if (k >= b.count || cuda::skip_step(h.found_inf)) return;
  const double step = cuda::bump_step(b, k);
  LambTensorCoeffs r;
  r.c = lamb_coeffs(step, h.beta1, h.beta2, h.weight_decay, h.eps, h.bias_correction);
  const double unscale = 1.0 / cuda::load_f64(h.grad_scale);
  const double clip = h.max_grad_norm > 0.0
      ? lamb_clip_factor(cuda::load_f64(h.global_grad_norm) * unscale, h.max_grad_norm)
      : 1.0;
  r.grad_mul = static_cast<float>(unscale * clip);
  r.scale = 0.f;
  const int32_t i = b.first + k;
  r.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(h.seed)), static_cast<uint32_t>(i));
  out[i] = r;
}

__global__ void lamb_prepare_kernel(const __grid_constant__ cuda::StepBatch b,
                                    const __grid_constant__ LambHyper h, LambTensorCoeffs* out) {
  lamb_prepare_one(b, h, out, blockIdx.x * blockDim.x + threadIdx.x);
}

// ---- phases 2 and 4 --------------------------------------------------------------------

enum : int { kParam, kGrad, kExpAvg, kExpAvgSq, kMaster, kNumLists };

struct LambMeta {
  int64_t chunk_base;  // first chunk of this tensor in the partials (phase 2)
  int32_t index;       // global tensor index
};

struct LambShared {
  ScalarRef found_inf;
  const LambTensorCoeffs* coeffs;
  bool wd;  // weight_decay != 0: a uniform runtime branch keeps the kernel count down

  DLOPT_HD bool load(const LambMeta& meta, LambTensorCoeffs& b) const {
    if (cuda::skip_step(found_inf)) return false;
    b = coeffs[meta.index];
    return true;
  }
  DLOPT_HD float direction(float p, float m, float v, const AdamCoeffs& c) const {
    return wd ? lamb_direction<true>(p, m, v, c) : lamb_direction<false>(p, m, v, c);
  }
};

// PS: param storage, S: state storage.
template <class PS, class S, bool MASTER>
struct LambMomentsOp : LambShared {
  static constexpr int kLists = kNumLists;
  static constexpr int kPartials = 2;  // sum p^2, sum u^2
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<std::conditional_t<MASTER, mta::NoAccess, mta::Access<PS, mta::kRead>>,
                    mta::Access<PS, mta::kRead>,       // grad
                    mta::Access<S, mta::kReadWrite>,   // exp_avg
                    mta::Access<S, mta::kReadWrite>,   // exp_avg_sq
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kRead>,
                                       mta::NoAccess>>>;
  using Meta = LambMeta;
  using Block = LambTensorCoeffs;
  double* partials;

  DLOPT_HD bool begin(const Meta& meta, Block& b) const { return load(meta, b); }
  DLOPT_HD float identity(int) const { return 0.f; }
  DLOPT_HD double combine(double a, double b, int) const { return a + b; }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t i,
                           float (&acc)[kPartials]) const {
    const float p = MASTER ? x[kMaster] : x[kParam];
    adam_moments(x[kGrad] * b.grad_mul, x[kExpAvg], x[kExpAvgSq], b.c);
    // u from the moments as they will be stored (rounded if low precision)
    const float m = S::load(S::store(x[kExpAvg], b, i));
    const float v = S::load(S::store(x[kExpAvgSq], b, i));
    const float u = direction(p, m, v, b.c);
    acc[0] += p * p;
    acc[1] += u * u;
  }
};

template <class PS, class S, bool MASTER>
struct LambApplyOp : LambShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::NoAccess,                                              // grad
                    mta::Access<S, mta::kRead>,                                 // exp_avg
                    mta::Access<S, mta::kRead>,                                 // exp_avg_sq
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = LambMeta;
  using Block = LambTensorCoeffs;

  DLOPT_HD bool begin(const Meta& meta, Block& b) const { return load(meta, b); }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    p = p - b.scale * direction(p, x[kExpAvg], x[kExpAvgSq], b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

// ---- phase 3 ---------------------------------------------------------------------------

struct LambTrust {
  static constexpr int kPartials = 2;
  LambTensorCoeffs* coeffs;
  ScalarRef lr, found_inf;
  DLOPT_HD float identity(int) const { return 0.f; }
  DLOPT_HD double combine(double a, double b, int) const { return a + b; }
  DLOPT_HD void finish(int64_t i, const double (&v)[kPartials]) const {
    if (cuda::skip_step(found_inf)) return;
    coeffs[i].scale =
        static_cast<float>(cuda::load_f64(lr) * lamb_trust_ratio(sqrt(v[0]), sqrt(v[1])));
  }
};

// ---- host --------------------------------------------------------------------------------

using Entries = std::vector<mta::TensorEntry<kNumLists, LambMeta>>;

// Phase 2 (reduce) or 4 of one storage group.
template <class PS, class S, bool MASTER>
struct PickLamb {
  static cudaError_t run(bool reduce, const LambShared& shared, double* partials,
                         const Entries& entries, cudaStream_t stream) {
    if (reduce) {
      LambMomentsOp<PS, S, MASTER> op;
      static_cast<LambShared&>(op) = shared;
      op.partials = partials;
      return mta::multi_tensor_reduce(entries, op, stream);
    }
    LambApplyOp<PS, S, MASTER> op;
    static_cast<LambShared&>(op) = shared;
    return mta::multi_tensor_apply(entries, op, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_lamb_step(const Launch& l, const ScalarRef& global_grad_norm, double beta1,
                             double beta2, double weight_decay, double eps, bool bias_correction,
                             double max_grad_norm) {
  const LambHyper h{l.lr,  l.grad_scale, global_grad_norm, l.found_inf, l.seed,
                    beta1, beta2,        weight_decay,     eps,         max_grad_norm,
                    bias_correction};
  std::vector<int64_t> numels(l.n);
  for (int32_t i = 0; i < l.n; ++i) numels[i] = l.entries[i].numel;
  const std::vector<int64_t> bases = mta::chunk_bases(numels);
  auto* coeffs = static_cast<LambTensorCoeffs*>(l.scratch.get(l.n * sizeof(LambTensorCoeffs)));
  auto* partials = static_cast<double*>(
      l.scratch.get(2 * std::max<int64_t>(bases[l.n], 1) * sizeof(double)));
  if (coeffs == nullptr || partials == nullptr) return cudaErrorMemoryAllocation;

  // Phase 1.
  DLOPT_CUDA_TRY(for_each_step_batch(l, [&](const StepBatch& b) {
#ifdef DLOPT_EMULATE  // a host-only build (multi_tensor_apply.cuh emulate_blocks)
    for (int k = 0; k < b.count; ++k) lamb_prepare_one(b, h, coeffs, k);
    return cudaSuccess;
#else
    lamb_prepare_kernel<<<(b.count + 127) / 128, 128, 0, l.stream>>>(b, h, coeffs);
    return cudaGetLastError();
#endif
  }));

  // Phases 2-4.
  const LambShared shared{h.found_inf, coeffs, weight_decay != 0.0};
  auto meta = [&](const ParamEntry& e) { return LambMeta{bases[e.index], e.index}; };
  const auto groups = mta::group_by_dtype<kNumLists, LambMeta>(l, meta);
  for (const auto& [key, entries] : groups)
    DLOPT_CUDA_TRY(pick_storage<PickLamb>(key.first, key.second, l.store, /*reduce=*/true,
                                          shared, partials, entries, l.stream));
  LambTrust trust;
  trust.coeffs = coeffs;
  trust.lr = h.lr;
  trust.found_inf = h.found_inf;
  DLOPT_CUDA_TRY(mta::segment_reduce(bases, partials, trust, l.stream));
  for (const auto& [key, entries] : groups)
    DLOPT_CUDA_TRY(pick_storage<PickLamb>(key.first, key.second, l.store, /*reduce=*/false,
                                          shared, partials, entries, l.stream));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace dlopt
