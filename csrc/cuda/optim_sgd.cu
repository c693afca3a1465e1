// Multi-tensor SGD step on CUDA, kernels and launcher (nvcc); the checks and the
// registered op are in optim_sgd_host.cpp (g++), semantics as csrc/cpu/optim_sgd.cpp.
//
// One launch series on the current stream, free of host syncs (capturable):
// multi_tensor_apply with SgdOp, one series per (param dtype, state dtype) group;
// each block reads found_inf (skip), builds the coefficients from lr (sgd_coeffs)
// and calls the shared sgd_update. SGD keeps no step count. lr, grad_scale,
// found_inf and sr_seed may live on the params' GPU (read by the kernels) or on
// the CPU (read by the host half, which needs no sync).
#include <tuple>
#include <type_traits>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"
#include "dlopt/sgd_math.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

enum : int { kParam, kGrad, kBuf, kMaster, kNumLists };

struct SgdShared {
  ScalarRef lr, grad_scale, found_inf, seed;
  double weight_decay, momentum, dampening;
  bool maximize;
};

struct SgdMeta {
  int32_t index;  // global tensor index
  int32_t first;  // the momentum buffer has no history: it becomes the grad
};

struct SgdBlock {
  SgdCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
  bool first;
};

// PS: param storage (its store may round stochastically), S: momentum buffer storage.
// MOMENTUM: 0 none, 1 heavy ball, 2 Nesterov.
template <class PS, class S, bool MASTER, int MOMENTUM, bool WD>
struct SgdOp : SgdShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::Access<PS, mta::kRead>,                                // grad
                    std::conditional_t<MOMENTUM != 0, mta::Access<S, mta::kReadWrite>,
                                       mta::NoAccess>,                          // buffer
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = SgdMeta;
  using Block = SgdBlock;

  DLOPT_HD bool begin(const Meta& m, Block& b) const {
    if (cuda::skip_step(found_inf)) return false;
    b.c = sgd_coeffs(cuda::load_f64(lr), weight_decay, momentum, dampening);
    b.grad_mul = static_cast<float>((maximize ? -1.0 : 1.0) / cuda::load_f64(grad_scale));
    b.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(seed)),
                             static_cast<uint32_t>(m.index));
    b.first = m.first != 0;
    return true;
  }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    sgd_update<WD, MOMENTUM != 0, MOMENTUM == 2>(p, x[kGrad] * b.grad_mul, x[kBuf], b.first, b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

using Entries = std::vector<mta::TensorEntry<kNumLists, SgdMeta>>;

template <class PS, class S, bool MASTER>
struct PickSgd {
  template <int MOMENTUM>
  static cudaError_t run(bool wd, const SgdShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    using On = SgdOp<PS, S, MASTER, MOMENTUM, true>;
    using Off = SgdOp<PS, S, MASTER, MOMENTUM, false>;
    return wd ? mta::multi_tensor_apply(entries, On{shared}, stream)
              : mta::multi_tensor_apply(entries, Off{shared}, stream);
  }
  static cudaError_t run(int momentum, bool wd, const SgdShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    switch (momentum) {
      case 0: return run<0>(wd, shared, entries, stream);
      case 1: return run<1>(wd, shared, entries, stream);
      default: return run<2>(wd, shared, entries, stream);
    }
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_sgd_step(const Launch& l, double weight_decay, double momentum,
                            double dampening, bool nesterov, bool maximize) {
  const SgdShared shared{l.lr, l.grad_scale, l.found_inf, l.seed, weight_decay, momentum,
                         dampening, maximize};
  const int mode = momentum == 0.0 ? 0 : (nesterov ? 2 : 1);
  auto meta = [](const ParamEntry& e) { return SgdMeta{e.index, e.new_buffer}; };
  return mta::apply_by_dtype<PickSgd, kNumLists, SgdMeta>(l, meta, mode, weight_decay != 0.0,
                                                         shared);
}

}  // namespace cuda
}  // namespace dlopt
