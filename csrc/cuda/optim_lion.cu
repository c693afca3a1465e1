// Multi-tensor Lion step on CUDA; same semantics as csrc/cpu/optim_lion.cpp.
//
// Two launches series on the current stream, free of host syncs (capturable):
//   1. bump_steps_kernel (dlopt/cuda_steps.cuh): every step += 1 unless found_inf.
//   2. multi_tensor_apply with LionOp, one launch series per (param dtype, state
//      dtype) group: each block re-reads found_inf (skip), builds the coefficients
//      from lr (lion_coeffs; no step dependence) and calls the shared lion_update.
// lr, grad_scale, found_inf and sr_seed may live on the params' GPU (read by the
// kernels) or on the CPU (read here on the host, which needs no sync).
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
#include "dlopt/lion_math.h"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

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
using Launcher = void (*)(const Entries&, const LionShared&);

template <class Op>
void launch(const Entries& entries, const LionShared& shared) {
  mta::multi_tensor_apply(entries, Op{shared});
}

template <class PS, class S, bool MASTER>
struct PickLion {
  static Launcher get(bool wd) {
    return wd ? &launch<LionOp<PS, S, MASTER, true>> : &launch<LionOp<PS, S, MASTER, false>>;
  }
};

void lion_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList master_params, at::TensorList state_steps,
                    const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  std::vector<at::Tensor> P(params.begin(), params.end());
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_elementwise_lists(P, grads, {{"exp_avgs", exp_avgs}}, master_params, state_steps, use_sr);
  if (n == 0) return;
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "dlopt: too many tensors");
  const c10::Device device = P[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::lion_step (cuda): params[0] is on ", device);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device() == device, "dlopt::lion_step (cuda): all tensors must be on one "
                "CUDA device, but params[", i, "] is on ", P[i].device(), " and params[0] on ",
                device);
    cuda::check_step_tensor(state_steps[i], device, i);
  }
  const cuda::StoreMode store = use_master ? cuda::StoreMode::kMaster
                                : use_sr   ? cuda::StoreMode::kStochastic
                                           : cuda::StoreMode::kNearest;

  const c10::cuda::CUDAGuard guard(device);
  LionShared shared;
  shared.lr = cuda::scalar_ref(lr, device, "lr", 0.0);
  shared.grad_scale = cuda::scalar_ref(grad_scale, device, "grad_scale", 1.0);
  shared.found_inf = cuda::scalar_ref(found_inf, device, "found_inf", 0.0);
  shared.seed = cuda::scalar_ref(sr_seed, device, "sr_seed", 0.0, /*integral=*/true);
  shared.beta1 = beta1;
  shared.beta2 = beta2;
  shared.weight_decay = weight_decay;
  shared.maximize = maximize;

  cuda::bump_steps(state_steps, shared.found_inf);

  AlignedLists L({P, grads.vec(), exp_avgs.vec(), master_params.vec()}, {true, false, true, true});
  std::map<std::tuple<int, int>, Entries> groups;  // (param dtype, state dtype)
  for (size_t i = 0; i < n; ++i) {
    mta::TensorEntry<kNumLists, int32_t> e{};
    e.numel = L[0][i].numel();
    if (e.numel == 0) continue;
    for (int k = 0; k < kNumLists; ++k) e.ptr[k] = L[k].empty() ? nullptr : L[k][i].data_ptr();
    e.meta = static_cast<int32_t>(i);
    groups[{static_cast<int>(L[0][i].scalar_type()), static_cast<int>(L[2][i].scalar_type())}]
        .push_back(e);
  }
  for (const auto& [key, entries] : groups) {
    const auto pt = static_cast<at::ScalarType>(std::get<0>(key));
    const auto st = static_cast<at::ScalarType>(std::get<1>(key));
    cuda::pick_storage<PickLion>(pt, st, store, weight_decay != 0.0)(entries, shared);
  }
  L.finish();
  for (auto list : {params, exp_avgs, master_params, state_steps}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("lion_step", &lion_step_cuda); }

}  // namespace dlopt
