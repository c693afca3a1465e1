// Multi-tensor Adam / AdamW step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/adam_math.h.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "dlopt/adam_math.h"
#include "dlopt/cpu_elementwise.h"

namespace dlopt {
namespace {

enum class WeightDecay { kNone, kL2, kDecoupled };

// State streams: 0 exp_avg, 1 exp_avg_sq, 2 max_exp_avg_sq (AMSGRAD). C: the
// arithmetic's type (fp32; double for float64 params).
template <WeightDecay WD, bool AMSGRAD, class C>
struct AdamOp {
  using Coeffs = AdamCoeffsOf<C>;
  static constexpr unsigned kReads = 3u | (AMSGRAD ? 4u : 0u);
  static constexpr unsigned kWrites = kReads;
  static DLOPT_HD void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c) {
    adam_update<WD == WeightDecay::kDecoupled, AMSGRAD, WD != WeightDecay::kNone>(p, g, s[0], s[1],
                                                                                   s[2], c);
  }
};

template <class P, class S, Store STORE, WeightDecay WD>
StepChunkFn<AdamCoeffsOf<typename P::C>> pick_amsgrad(bool amsgrad) {
  using C = typename P::C;
  return amsgrad ? &step_chunk<AdamOp<WD, true, C>, P, S, STORE>
                 : &step_chunk<AdamOp<WD, false, C>, P, S, STORE>;
}

template <class P, class S, Store STORE>
struct PickAdam {
  static StepChunkFn<AdamCoeffsOf<typename P::C>> get(WeightDecay wd, bool amsgrad) {
    switch (wd) {
      case WeightDecay::kNone: return pick_amsgrad<P, S, STORE, WeightDecay::kNone>(amsgrad);
      case WeightDecay::kL2: return pick_amsgrad<P, S, STORE, WeightDecay::kL2>(amsgrad);
      default: return pick_amsgrad<P, S, STORE, WeightDecay::kDecoupled>(amsgrad);
    }
  }
};

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList master_params, at::TensorList state_steps, const at::Tensor& lr,
                   double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                   bool maximize, bool decoupled_weight_decay,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const at::TensorList P = params;
  check_same_length(P, grads, "grads", false);
  check_same_length(P, exp_avgs, "exp_avgs", false);
  check_same_length(P, exp_avg_sqs, "exp_avg_sqs", false);
  check_same_length(P, max_exp_avg_sqs, "max_exp_avg_sqs", !amsgrad);
  check_same_length(P, master_params, "master_params", true);
  check_same_length(P, state_steps, "state_steps", false);
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "dlopt: amsgrad needs max_exp_avg_sqs");
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included
  // (torch increments then subtracts found_inf: same end state).
  if (skip_step(found_inf)) return;
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  const Store store = store_mode(use_master, use_sr);
  const double lr_v = scalar_value(lr, "lr");
  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled_weight_decay ? WeightDecay::kDecoupled
                                                  : WeightDecay::kL2;

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = P[i];
    TORCH_CHECK(p.device().is_cpu(), "dlopt::adam_step (cpu): params[", i, "] is on ", p.device());
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "dlopt: grads[", i, "] dtype ",
                grads[i].scalar_type(), " != params dtype ", p.scalar_type());
    check_like_param(p, grads[i], "grads", i);
    check_like_param(p, exp_avgs[i], "exp_avgs", i);
    check_like_param(p, exp_avg_sqs[i], "exp_avg_sqs", i);
    if (amsgrad) check_like_param(p, max_exp_avg_sqs[i], "max_exp_avg_sqs", i);
    if (use_master) {
      check_like_param(p, master_params[i], "master_params", i);
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat, "dlopt: master_params must be float32");
    }
    const auto st = exp_avgs[i].scalar_type();
    TORCH_CHECK(st == at::kFloat || st == p.scalar_type(), "dlopt: exp_avgs[", i, "] dtype ", st,
                " must be float32 or the param dtype");
    TORCH_CHECK(exp_avg_sqs[i].scalar_type() == st && (!amsgrad || max_exp_avg_sqs[i].scalar_type() == st),
                "dlopt: state tensors of params[", i, "] must share one dtype");
    TORCH_CHECK(!use_master || st == at::kFloat, "dlopt: master weights need float32 states");
    TORCH_CHECK(!use_sr || p.scalar_type() != at::kHalf,
                "dlopt: stochastic rounding supports bfloat16 and float32 params, not float16");
    check_step_tensor(state_steps[i], i);
  }

  const bool wide = float64_call(P, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, use_master);

  AlignedLists L({P, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params},
                 {true, false, true, true, true, true});

  run_step_for<AdamCoeffsOf>(wide, L, 3, use_master, sr_seed_value(sr_seed),
                             grad_multiplier(maximize, grad_scale), [&](size_t i, auto& a) {
                               using C = typename std::decay_t<decltype(a.c)>::Compute;
                               const double step = increment_step(state_steps[i]);
                               a.c = adam_coeffs<C>(lr_v, step, beta1, beta2, weight_decay, eps);
                               return pick_storage_for<PickAdam, C>(
                                   L[0][i].scalar_type(), L[2][i].scalar_type(), store, wd, amsgrad);
                             });
  for (auto list : {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, "
      "Tensor(f!)[] state_steps, Tensor lr, float beta1, float beta2, float weight_decay, "
      "float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

}  // namespace dlopt
