// Multi-tensor Lion step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/lion_math.h.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <type_traits>

#include "dlopt/cpu_elementwise.h"
#include "dlopt/lion_math.h"

namespace dlopt {
namespace {

// C: the arithmetic's type (fp32; double for float64 params).
template <bool WEIGHT_DECAY, class C>
struct LionOp {
  using Coeffs = LionCoeffsOf<C>;
  static constexpr unsigned kReads = 1u, kWrites = 1u;  // exp_avg
  static DLOPT_HD void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c) {
    lion_update<WEIGHT_DECAY>(p, g, s[0], c);
  }
};

template <class P, class S, Store STORE>
struct PickLion {
  static StepChunkFn<LionCoeffsOf<typename P::C>> get(bool weight_decay) {
    using C = typename P::C;
    return weight_decay ? &step_chunk<LionOp<true, C>, P, S, STORE>
                        : &step_chunk<LionOp<false, C>, P, S, STORE>;
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
  const Store store = store_mode(use_master, use_sr);
  const double lr_v = scalar_value(lr, "lr");
  const bool wide = float64_call(P, {exp_avgs}, use_master);

  AlignedLists L({P, grads, exp_avgs, master_params}, {true, false, true, true});
  run_step_for<LionCoeffsOf>(wide, L, 1, use_master, sr_seed_value(sr_seed),
                             grad_multiplier(maximize, grad_scale), [&](size_t i, auto& a) {
                               using C = typename std::decay_t<decltype(a.c)>::Compute;
                               increment_step(state_steps[i]);
                               a.c = lion_coeffs<C>(lr_v, beta1, beta2, weight_decay);
                               return pick_storage_for<PickLion, C>(
                                   L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                   weight_decay != 0.0);
                             });
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
