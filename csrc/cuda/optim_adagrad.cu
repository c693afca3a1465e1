// Multi-tensor Adagrad step on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in optim_adagrad_host.cpp (g++), semantics as csrc/cpu/optim_adagrad.cpp.
//
// Two launch series on the current stream, free of host syncs (capturable):
//   1. bump_steps_kernel (dlopt/cuda_steps.cuh): every step += 1 unless found_inf.
//   2. multi_tensor_apply with AdagradOp, one series per (param dtype, state dtype)
//      group: each block re-reads found_inf (skip), reads its tensor's new step (stream
//      order puts it after phase 1), builds adagrad_coeffs and calls adagrad_update.
// lr, grad_scale, found_inf and sr_seed may live on the params' GPU (read by the
// kernels) or on the CPU (read by the host half, which needs no sync).
#include <tuple>
#include <type_traits>

#include "dlopt/adagrad_math.h"
#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

enum : int { kParam, kGrad, kSum, kMaster, kNumLists };

struct AdagradShared {
  ScalarRef lr, grad_scale, found_inf, seed;
  double lr_decay, weight_decay, eps;
  bool maximize;
};

struct AdagradMeta {
  const void* step;   // the tensor's step count (float32 or float64), already bumped
  int32_t index;      // global tensor index
  int32_t is_double;  // step dtype
};

struct AdagradBlock {
  AdagradCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

// PS: param storage (its store may round stochastically), S: state_sum storage.
template <class PS, class S, bool MASTER, bool WD>
struct AdagradOp : AdagradShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::Access<PS, mta::kRead>,                                // grad
                    mta::Access<S, mta::kReadWrite>,                            // sum
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = AdagradMeta;
  using Block = AdagradBlock;

  DLOPT_HD bool begin(const Meta& m, Block& b) const {
    if (cuda::skip_step(found_inf)) return false;
    const double step = m.is_double ? *static_cast<const double*>(m.step)
                                    : static_cast<double>(*static_cast<const float*>(m.step));
    b.c = adagrad_coeffs(cuda::load_f64(lr), step, lr_decay, weight_decay, eps);
    b.grad_mul = static_cast<float>((maximize ? -1.0 : 1.0) / cuda::load_f64(grad_scale));
    b.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(seed)),
                             static_cast<uint32_t>(m.index));
    return true;
  }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    adagrad_update<WD>(p, x[kGrad] * b.grad_mul, x[kSum], b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

using Entries = std::vector<mta::TensorEntry<kNumLists, AdagradMeta>>;

template <class PS, class S, bool MASTER>
struct PickAdagrad {
  static cudaError_t run(bool wd, const AdagradShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    return wd ? mta::multi_tensor_apply(entries, AdagradOp<PS, S, MASTER, true>{shared}, stream)
              : mta::multi_tensor_apply(entries, AdagradOp<PS, S, MASTER, false>{shared}, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_adagrad_step(const Launch& l, double lr_decay, double weight_decay, double eps,
                                bool maximize) {
  const AdagradShared shared{l.lr, l.grad_scale, l.found_inf, l.seed, lr_decay, weight_decay,
                             eps, maximize};
  DLOPT_CUDA_TRY(bump_steps(l));
  auto meta = [&](const ParamEntry& e) {
    return AdagradMeta{l.steps[e.index].ptr, e.index, l.steps[e.index].is_double};
  };
  return mta::apply_by_dtype<PickAdagrad, kNumLists, AdagradMeta>(l, meta, weight_decay != 0.0,
                                                                  shared);
}

}  // namespace cuda
}  // namespace dlopt
