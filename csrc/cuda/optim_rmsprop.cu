// Multi-tensor RMSprop step on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in optim_rmsprop_host.cpp (g++), semantics as csrc/cpu/optim_rmsprop.cpp.
//
// Two launch series on the current stream, free of host syncs (capturable):
//   1. bump_steps_kernel (dlopt/cuda_steps.cuh): every step += 1 unless found_inf
//      (RMSprop's maths does not use the step; torch's state keeps it).
//   2. multi_tensor_apply with RmspropOp, one series per (param dtype, state dtype)
//      group: each block re-reads found_inf (skip), builds the coefficients from lr
//      (rmsprop_coeffs) and calls the shared rmsprop_update.
// lr, grad_scale, found_inf and sr_seed may live on the params' GPU (read by the
// kernels) or on the CPU (read by the host half, which needs no sync).
#include <tuple>
#include <type_traits>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rmsprop_math.h"
#include "dlopt/rounding.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

enum : int { kParam, kGrad, kSquareAvg, kGradAvg, kBuf, kMaster, kNumLists };

struct RmspropShared {
  ScalarRef lr, grad_scale, found_inf, seed;
  double alpha, eps, weight_decay, momentum;
  bool maximize;
  bool wd;  // uniform per launch: a runtime switch keeps the kernel count down
};

struct RmspropBlock {
  RmspropCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

// PS: param storage (its store may round stochastically), S: state storage.
template <class PS, class S, bool MASTER, bool CENTERED, bool MOMENTUM>
struct RmspropOp : RmspropShared {
  static constexpr int kLists = kNumLists;
  template <bool USED>
  using State = std::conditional_t<USED, mta::Access<S, mta::kReadWrite>, mta::NoAccess>;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::Access<PS, mta::kRead>,                                // grad
                    State<true>,                                                // square_avg
                    State<CENTERED>,                                            // grad_avg
                    State<MOMENTUM>,                                            // buffer
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = int32_t;  // global tensor index
  using Block = RmspropBlock;

  DLOPT_HD bool begin(const Meta& i, Block& b) const {
    if (cuda::skip_step(found_inf)) return false;
    b.c = rmsprop_coeffs(cuda::load_f64(lr), alpha, eps, weight_decay, momentum);
    b.grad_mul = static_cast<float>((maximize ? -1.0 : 1.0) / cuda::load_f64(grad_scale));
    b.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(seed)), static_cast<uint32_t>(i));
    return true;
  }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    const float g = x[kGrad] * b.grad_mul;
    if (wd)
      rmsprop_update<true, CENTERED, MOMENTUM>(p, g, x[kSquareAvg], x[kGradAvg], x[kBuf], b.c);
    else
      rmsprop_update<false, CENTERED, MOMENTUM>(p, g, x[kSquareAvg], x[kGradAvg], x[kBuf], b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

using Entries = std::vector<mta::TensorEntry<kNumLists, int32_t>>;

template <class PS, class S, bool MASTER>
struct PickRmsprop {
  template <bool CENTERED, bool MOMENTUM>
  static cudaError_t run(const RmspropShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    return mta::multi_tensor_apply(entries, RmspropOp<PS, S, MASTER, CENTERED, MOMENTUM>{shared},
                                   stream);
  }
  static cudaError_t run(bool centered, bool momentum, const RmspropShared& shared,
                         const Entries& entries, cudaStream_t stream) {
    if (centered)
      return momentum ? run<true, true>(shared, entries, stream)
                      : run<true, false>(shared, entries, stream);
    return momentum ? run<false, true>(shared, entries, stream)
                    : run<false, false>(shared, entries, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_rmsprop_step(const Launch& l, double alpha, double eps, double weight_decay,
                                double momentum, bool centered, bool maximize) {
  const RmspropShared shared{l.lr, l.grad_scale, l.found_inf, l.seed, alpha, eps,
                             weight_decay, momentum, maximize, /*wd=*/weight_decay != 0.0};
  DLOPT_CUDA_TRY(bump_steps(l));
  const bool use_momentum = momentum > 0.0;  // torch: `if momentum > 0`
  return mta::apply_by_dtype<PickRmsprop, kNumLists, int32_t>(l, mta::tensor_index, centered,
                                                             use_momentum, shared);
}

}  // namespace cuda
}  // namespace dlopt
