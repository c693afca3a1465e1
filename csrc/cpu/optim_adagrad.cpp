// Multi-tensor Adagrad step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/adagrad_math.h.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/adagrad_math.h"
#include "dlopt/cpu_elementwise.h"

namespace dlopt {
namespace {

template <bool WD>
struct AdagradOp {
  using Coeffs = AdagradCoeffs;
  static constexpr unsigned kReads = 1u, kWrites = 1u;  // state_sum
  static DLOPT_HD void update(float& p, float g, float (&s)[kMaxStates], const Coeffs& c) {
    adagrad_update<WD>(p, g, s[0], c);
  }
};

template <class P, class S, Store STORE>
struct PickAdagrad {
  static StepChunkFn<AdagradCoeffs> get(bool wd) {
    return wd ? &step_chunk<AdagradOp<true>, P, S, STORE>
              : &step_chunk<AdagradOp<false>, P, S, STORE>;
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

  AlignedLists L({P, grads, state_sums, master_params}, {true, false, true, true});
  run_step<AdagradCoeffs>(L, 1, use_master, sr_seed_value(sr_seed),
                          static_cast<float>(grad_multiplier(maximize, grad_scale)),
                          [&](size_t i, StepArgs<AdagradCoeffs>& a) {
                            const double step = increment_step(state_steps[i]);
                            a.c = adagrad_coeffs(lr_v, step, lr_decay, weight_decay, eps);
                            return pick_storage<PickAdagrad>(L[0][i].scalar_type(),
                                                             L[2][i].scalar_type(), store,
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
