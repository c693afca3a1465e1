// Multi-tensor RMSprop step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/rmsprop_math.h. RMSprop's maths does not use the step
// count; it is counted as torch's state keeps it.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "dlopt/cpu_elementwise.h"
#include "dlopt/rmsprop_math.h"

namespace dlopt {
namespace {

// State streams: 0 square_avg, 1 grad_avg (CENTERED), 2 momentum_buffer (MOMENTUM).
// C: the arithmetic's type (fp32; double for float64 params).
template <bool WD, bool CENTERED, bool MOMENTUM, class C>
struct RmspropOp {
  using Coeffs = RmspropCoeffsOf<C>;
  static constexpr unsigned kReads = 1u | (CENTERED ? 2u : 0u) | (MOMENTUM ? 4u : 0u);
  static constexpr unsigned kWrites = kReads;
  static DLOPT_HD void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c) {
    rmsprop_update<WD, CENTERED, MOMENTUM>(p, g, s[0], s[1], s[2], c);
  }
};

template <class P, class S, Store STORE, bool WD>
StepChunkFn<RmspropCoeffsOf<typename P::C>> pick_variant(bool centered, bool momentum) {
  using C = typename P::C;
  if (centered)
    return momentum ? &step_chunk<RmspropOp<WD, true, true, C>, P, S, STORE>
                    : &step_chunk<RmspropOp<WD, true, false, C>, P, S, STORE>;
  return momentum ? &step_chunk<RmspropOp<WD, false, true, C>, P, S, STORE>
                  : &step_chunk<RmspropOp<WD, false, false, C>, P, S, STORE>;
}

template <class P, class S, Store STORE>
struct PickRmsprop {
  static StepChunkFn<RmspropCoeffsOf<typename P::C>> get(bool wd, bool centered, bool momentum) {
    return wd ? pick_variant<P, S, STORE, true>(centered, momentum)
              : pick_variant<P, S, STORE, false>(centered, momentum);
  }
};

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers,
                      at::TensorList master_params, at::TensorList state_steps,
                      const at::Tensor& lr, double alpha, double eps, double weight_decay,
                      double momentum, bool centered, bool maximize,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const bool use_momentum = momentum > 0.0;  // torch: `if momentum > 0`
  const at::TensorList P = params;
  const at::TensorList gas = centered ? grad_avgs : at::TensorList();
  const at::TensorList bufs = use_momentum ? momentum_buffers : at::TensorList();
  const bool use_sr = sr_seed.has_value();
  std::vector<NamedList> states{{"square_avgs", square_avgs}};
  if (centered) states.push_back({"grad_avgs", gas});
  if (use_momentum) states.push_back({"momentum_buffers", bufs});
  check_elementwise_lists(P, grads, states, master_params, state_steps, use_sr);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::rmsprop_step (cpu): params[", i, "] is on ",
                P[i].device());
    check_step_tensor(state_steps[i], i);
  }
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included.
  if (skip_step(found_inf)) return;
  const bool use_master = !master_params.empty();
  const Store store = store_mode(use_master, use_sr);
  const double lr_v = scalar_value(lr, "lr");
  const bool wide = float64_call(P, {square_avgs, gas, bufs}, use_master);

  AlignedLists L({P, grads, square_avgs, gas, bufs, master_params},
                 {true, false, true, true, true, true});
  run_step_for<RmspropCoeffsOf>(wide, L, 3, use_master, sr_seed_value(sr_seed),
                                grad_multiplier(maximize, grad_scale), [&](size_t i, auto& a) {
                                  using C = typename std::decay_t<decltype(a.c)>::Compute;
                                  increment_step(state_steps[i]);
                                  a.c = rmsprop_coeffs<C>(lr_v, alpha, eps, weight_decay,
                                                          momentum);
                                  return pick_storage_for<PickRmsprop, C>(
                                      L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                      weight_decay != 0.0, centered, use_momentum);
                                });
  for (auto list : {params, square_avgs, gas, bufs, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "rmsprop_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, "
      "Tensor(c!)[] grad_avgs, Tensor(d!)[] momentum_buffers, Tensor(e!)[] master_params, "
      "Tensor(f!)[] state_steps, Tensor lr, float alpha, float eps, float weight_decay, "
      "float momentum, bool centered, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("rmsprop_step", &rmsprop_step_cpu); }

}  // namespace dlopt
