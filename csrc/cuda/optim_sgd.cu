// Multi-tensor SGD step on CUDA; same semantics as csrc/cpu/optim_sgd.cpp.
//
// One launch series on the current stream, free of host syncs (capturable):
// multi_tensor_apply with SgdOp, one series per (param dtype, state dtype) group;
// each block reads found_inf (skip), builds the coefficients from lr (sgd_coeffs)
// and calls the shared sgd_update. SGD keeps no step count. lr, grad_scale,
// found_inf and sr_seed may live on the params' GPU (read by the kernels) or on
// the CPU (read here on the host, which needs no sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"
#include "dlopt/sgd_math.h"
#include "dlopt/tensor_lists.h"

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
using Launcher = void (*)(const Entries&, const SgdShared&);

template <class Op>
void launch(const Entries& entries, const SgdShared& shared) {
  mta::multi_tensor_apply(entries, Op{shared});
}

template <class PS, class S, bool MASTER>
struct PickSgd {
  template <int MOMENTUM>
  static Launcher with(bool wd) {
    return wd ? &launch<SgdOp<PS, S, MASTER, MOMENTUM, true>>
              : &launch<SgdOp<PS, S, MASTER, MOMENTUM, false>>;
  }
  static Launcher get(int momentum, bool wd) {
    switch (momentum) {
      case 0: return with<0>(wd);
      case 1: return with<1>(wd);
      default: return with<2>(wd);
    }
  }
};

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList master_params, const at::Tensor& lr, double weight_decay,
                   double momentum, double dampening, bool nesterov, bool maximize,
                   c10::List<bool> new_buffers, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const bool use_momentum = momentum != 0.0;
  std::vector<at::Tensor> P(params.begin(), params.end());
  const at::TensorList bufs = use_momentum ? momentum_buffers : at::TensorList();
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  std::vector<NamedList> states;
  if (use_momentum) states.push_back({"momentum_buffers", bufs});
  check_elementwise_lists(P, grads, states, master_params, {}, sr_seed.has_value(),
                          /*has_steps=*/false);
  TORCH_CHECK(new_buffers.empty() || new_buffers.size() == n, "dlopt: new_buffers has ",
              new_buffers.size(), " entries but params has ", n);
  if (n == 0) return;
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "dlopt: too many tensors");
  const c10::Device device = P[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::sgd_step (cuda): params[0] is on ", device);
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(P[i].device() == device, "dlopt::sgd_step (cuda): all tensors must be on one "
                "CUDA device, but params[", i, "] is on ", P[i].device(), " and params[0] on ", device);
  const cuda::StoreMode store = use_master ? cuda::StoreMode::kMaster
                                : use_sr   ? cuda::StoreMode::kStochastic
                                           : cuda::StoreMode::kNearest;

  const c10::cuda::CUDAGuard guard(device);
  SgdShared shared;
  shared.lr = cuda::scalar_ref(lr, device, "lr", 0.0);
  shared.grad_scale = cuda::scalar_ref(grad_scale, device, "grad_scale", 1.0);
  shared.found_inf = cuda::scalar_ref(found_inf, device, "found_inf", 0.0);
  shared.seed = cuda::scalar_ref(sr_seed, device, "sr_seed", 0.0, /*integral=*/true);
  shared.weight_decay = weight_decay;
  shared.momentum = momentum;
  shared.dampening = dampening;
  shared.maximize = maximize;
  const int mode = !use_momentum ? 0 : (nesterov ? 2 : 1);

  AlignedLists L({P, grads.vec(), bufs.vec(), master_params.vec()}, {true, false, true, true});
  std::map<std::tuple<int, int>, Entries> groups;  // (param dtype, state dtype)
  for (size_t i = 0; i < n; ++i) {
    mta::TensorEntry<kNumLists, SgdMeta> e{};
    e.numel = L[0][i].numel();
    if (e.numel == 0) continue;
    for (int k = 0; k < kNumLists; ++k) e.ptr[k] = L[k].empty() ? nullptr : L[k][i].data_ptr();
    e.meta.index = static_cast<int32_t>(i);
    e.meta.first = use_momentum && !new_buffers.empty() && new_buffers.get(i);
    const auto st = use_momentum ? L[2][i].scalar_type() : at::kFloat;
    groups[{static_cast<int>(L[0][i].scalar_type()), static_cast<int>(st)}].push_back(e);
  }
  for (const auto& [key, entries] : groups) {
    const auto pt = static_cast<at::ScalarType>(std::get<0>(key));
    const auto st = static_cast<at::ScalarType>(std::get<1>(key));
    cuda::pick_storage<PickSgd>(pt, st, store, mode, weight_decay != 0.0)(entries, shared);
  }
  L.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("sgd_step", &sgd_step_cuda); }

}  // namespace dlopt
