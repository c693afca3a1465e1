// Multi-tensor Lion step on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in optim_lion_host.cpp (g++), semantics as csrc/cpu/optim_lion.cpp.
//
// Two launch series on the current stream, free of host syncs (capturable):
//   1. bump_steps_kernel (dlopt/cuda_steps.cuh): every step += 1 unless found_inf.
//   2. multi_tensor_apply with LionOp, one launch series per (param dtype, state
//      dtype) group: each block re-reads found_inf (skip), builds the coefficients
//      from lr (lion_coeffs; no step dependence) and calls the shared lion_update.
// lr, grad_scale, found_inf and sr_seed may live on the params' GPU (read by the
// kernels) or on the CPU (read by the host half, which needs no sync).
#include <tuple>
#include <type_traits>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/lion_math.h"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

enum : int { kParam, kGrad, kExpAvg, kMaster, kNumLists };

struct LionShared {
  ScalarRef lr, grad_scale, found_inf, seed;
  double beta1, beta2, weight_decay;
  bool maximize;
};

struct LionBlock {
  LionCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

// PS: param storage (its store may round stochastically), S: exp_avg storage.
template <class PS, class S, bool MASTER, bool WD>
struct LionOp : LionShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::Access<PS, mta::kRead>,                                // grad
                    mta::Access<S, mta::kReadWrite>,                            // exp_avg
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = int32_t;  // global tensor index
  using Block = LionBlock;

  DLOPT_HD bool begin(const Meta& i, Block& b) const {
    if (cuda::skip_step(found_inf)) return false;
    b.c = lion_coeffs(cuda::load_f64(lr), beta1, beta2, weight_decay);
    b.grad_mul = static_cast<float>((maximize ? -1.0 : 1.0) / cuda::load_f64(grad_scale));
    b.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(seed)), static_cast<uint32_t>(i));
    return true;
  }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    lion_update<WD>(p, x[kGrad] * b.grad_mul, x[kExpAvg], b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

using Entries = std::vector<mta::TensorEntry<kNumLists, int32_t>>;

template <class PS, class S, bool MASTER>
struct PickLion {
  static cudaError_t run(bool wd, const LionShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    return wd ? mta::multi_tensor_apply(entries, LionOp<PS, S, MASTER, true>{shared}, stream)
              : mta::multi_tensor_apply(entries, LionOp<PS, S, MASTER, false>{shared}, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_lion_step(const Launch& l, double beta1, double beta2, double weight_decay,
                             bool maximize) {
  const LionShared shared{l.lr, l.grad_scale, l.found_inf, l.seed, beta1, beta2, weight_decay,
                          maximize};
  DLOPT_CUDA_TRY(bump_steps(l));
  return mta::apply_by_dtype<PickLion, kNumLists, int32_t>(l, mta::tensor_index,
                                                          weight_decay != 0.0, shared);
}

}  // namespace cuda
}  // namespace dlopt
