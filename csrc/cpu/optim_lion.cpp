// Multi-tensor Lion step on the CPU: one parallel region over 32K-element chunks of
// every tensor in the list, each chunk one vectorizable loop calling the shared
// per-element maths in dlopt/lion_math.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/lion_math.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct LionTensorArgs {
  void* p;
  const void* g;
  void* m;
  float* master;
  LionCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

using ChunkFn = void (*)(const LionTensorArgs&, int64_t, int64_t);

template <class P, class S, Store STORE, bool WEIGHT_DECAY>
void lion_chunk(const LionTensorArgs& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ m = ck.offset(static_cast<typename S::T*>(a.m));
  float* __restrict__ master = ck.offset(a.master);
  const LionCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, g, m, master);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      float pf = load_param<P, STORE>(p, master, i);
      float mf = S::load(m[i]);
      lion_update<WEIGHT_DECAY>(pf, P::load(g[i]) * grad_mul, mf, c);
      m[i] = S::store(mf);
      write_param<P, STORE>(p, master, pf, key, i, ck.base);
    }
  }
}

template <class P, class S, Store STORE>
struct PickLion {
  static ChunkFn get(bool weight_decay) {
    return weight_decay ? &lion_chunk<P, S, STORE, true> : &lion_chunk<P, S, STORE, false>;
  }
};

void lion_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList master_params, at::TensorList state_steps, const at::Tensor& lr,
                   double beta1, double beta2, double weight_decay, bool maximize,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const at::TensorList P = params;
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_elementwise_lists(P, grads, {{"exp_avgs", exp_avgs}}, master_params, state_steps, use_sr);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::lion_step (cpu): params[", i, "] is on ",
                P[i].device());
    check_step_tensor(state_steps[i], i);
  }
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included.
  if (skip_step(found_inf)) return;
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const LionCoeffs c = lion_coeffs(scalar_value(lr, "lr"), beta1, beta2, weight_decay);
  const float grad_mul = static_cast<float>(grad_multiplier(maximize, grad_scale));
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;

  AlignedLists L({P, grads, exp_avgs, master_params}, {true, false, true, true});
  std::vector<LionTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    increment_step(state_steps[i]);
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    LionTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.m = L[2][i].data_ptr();
    a.master = use_master ? L[3][i].data_ptr<float>() : nullptr;
    a.c = c;
    a.grad_mul = grad_mul;
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    fns[i] = pick_storage<PickLion>(L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                    weight_decay != 0.0);
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
  for (auto list : {params, exp_avgs, master_params, state_steps}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "lion_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] master_params, Tensor(d!)[] state_steps, Tensor lr, float beta1, "
      "float beta2, float weight_decay, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("lion_step", &lion_step_cpu); }

}  // namespace dlopt
