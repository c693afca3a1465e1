// Multi-tensor Adagrad step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/adagrad_math.h.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "dlopt/adagrad_math.h"
#include "dlopt/cpu_elementwise.h"

namespace dlopt {
namespace {

// C: the arithmetic's type (fp32; double for float64 params).
template <bool WD, class C>
struct AdagradOp {
  using Coeffs = AdagradCoeffsOf<C>;
  static constexpr unsigned kReads = 1u, kWrites = 1u;  // state_sum
  static DLOPT_HD void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c) {
    adagrad_update<WD>(p, g, s[0], c);
  }
};

template <class P, class S, Store STORE>
struct PickAdagrad {
  static StepChunkFn<AdagradCoeffsOf<typename P::C>> get(bool wd) {
    using C = typename P::C;
    return wd ? &step_chunk<AdagradOp<true, C>, P, S, STORE>
              : &step_chunk<AdagradOp<false, C>, P, S, STORE>;
  }
};

void adagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                      at::TensorList master_params, at::TensorList state_steps,
                      const at::Tensor& lr, double lr_decay, double weight_decay, double eps,
                      bool maximize, const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const at::TensorList P = params;
  check_elementwise_lists(P, grads, {{"state_sums", state_sums}}, master_params, state_steps,
                          sr_seed.has_value());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::adagrad_step (cpu): params[", i, "] is on ",
                P[i].device());
    check_step_tensor(state_steps[i], i);
  }
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included.
  if (skip_step(found_inf)) return;
  const bool use_master = !master_params.empty();
  const Store store = store_mode(use_master, sr_seed.has_value());
  const double lr_v = scalar_value(lr, "lr");

  const bool wide = float64_call(P, {state_sums}, use_master);

  AlignedLists L({P, grads, state_sums, master_params}, {true, false, true, true});
  run_step_for<AdagradCoeffsOf>(wide, L, 1, use_master, sr_seed_value(sr_seed),
                                grad_multiplier(maximize, grad_scale), [&](size_t i, auto& a) {
                                  using C = typename std::decay_t<decltype(a.c)>::Compute;
                                  const double step = increment_step(state_steps[i]);
                                  a.c = adagrad_coeffs<C>(lr_v, step, lr_decay, weight_decay, eps);
                                  return pick_storage_for<PickAdagrad, C>(
                                      L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                      weight_decay != 0.0);
                                });
  for (auto list : {params, state_sums, master_params, state_steps}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "adagrad_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] master_params, Tensor(d!)[] state_steps, Tensor lr, float lr_decay, "
      "float weight_decay, float eps, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("adagrad_step", &adagrad_step_cpu); }

}  // namespace dlopt
