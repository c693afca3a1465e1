// Multi-tensor Adagrad step on CUDA; same semantics as csrc/cpu/optim_adagrad.cpp.
//
// Two launch series on the current stream, free of host syncs (capturable):
//   1. bump_steps_kernel (dlopt/cuda_steps.cuh): every step += 1 unless found_inf.
//   2. multi_tensor_apply with AdagradOp, one series per (param dtype, state dtype)
//      group: each block re-reads found_inf (skip), reads its tensor's new step (stream
//      order puts it after phase 1), builds adagrad_coeffs and calls adagrad_update.
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

#include "dlopt/adagrad_math.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

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
using Launcher = void (*)(const Entries&, const AdagradShared&);

template <class Op>
void launch(const Entries& entries, const AdagradShared& shared) {
  mta::multi_tensor_apply(entries, Op{shared});
}

template <class PS, class S, bool MASTER>
struct PickAdagrad {
  static Launcher get(bool wd) {
    return wd ? &launch<AdagradOp<PS, S, MASTER, true>> : &launch<AdagradOp<PS, S, MASTER, false>>;
  }
};

void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList master_params, at::TensorList state_steps,
                       const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                       bool maximize, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  std::vector<at::Tensor> P(params.begin(), params.end());
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_elementwise_lists(P, grads, {{"state_sums", state_sums}}, master_params, state_steps,
                          use_sr);
  if (n == 0) return;
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "dlopt: too many tensors");
  const c10::Device device = P[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::adagrad_step (cuda): params[0] is on ", device);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device() == device, "dlopt::adagrad_step (cuda): all tensors must be on one "
                "CUDA device, but params[", i, "] is on ", P[i].device(), " and params[0] on ", device);
    cuda::check_step_tensor(state_steps[i], device, i);
  }
  const cuda::StoreMode store = use_master ? cuda::StoreMode::kMaster
                                : use_sr   ? cuda::StoreMode::kStochastic
                                           : cuda::StoreMode::kNearest;

  const c10::cuda::CUDAGuard guard(device);
  AdagradShared shared;
  shared.lr = cuda::scalar_ref(lr, device, "lr", 0.0);
  shared.grad_scale = cuda::scalar_ref(grad_scale, device, "grad_scale", 1.0);
  shared.found_inf = cuda::scalar_ref(found_inf, device, "found_inf", 0.0);
  shared.seed = cuda::scalar_ref(sr_seed, device, "sr_seed", 0.0, /*integral=*/true);
  shared.lr_decay = lr_decay;
  shared.weight_decay = weight_decay;
  shared.eps = eps;
  shared.maximize = maximize;

  cuda::bump_steps(state_steps, shared.found_inf);

  AlignedLists L({P, grads.vec(), state_sums.vec(), master_params.vec()},
                 {true, false, true, true});
  std::map<std::tuple<int, int>, Entries> groups;  // (param dtype, state dtype)
  for (size_t i = 0; i < n; ++i) {
    mta::TensorEntry<kNumLists, AdagradMeta> e{};
    e.numel = L[0][i].numel();
    if (e.numel == 0) continue;
    for (int k = 0; k < kNumLists; ++k) e.ptr[k] = L[k].empty() ? nullptr : L[k][i].data_ptr();
    e.meta.step = state_steps[i].const_data_ptr();
    e.meta.index = static_cast<int32_t>(i);
    e.meta.is_double = state_steps[i].scalar_type() == at::kDouble;
    groups[{static_cast<int>(L[0][i].scalar_type()), static_cast<int>(L[2][i].scalar_type())}]
        .push_back(e);
  }
  for (const auto& [key, entries] : groups) {
    const auto pt = static_cast<at::ScalarType>(std::get<0>(key));
    const auto st = static_cast<at::ScalarType>(std::get<1>(key));
    cuda::pick_storage<PickAdagrad>(pt, st, store, weight_decay != 0.0)(entries, shared);
  }
  L.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("adagrad_step", &adagrad_step_cuda); }

}  // namespace dlopt
