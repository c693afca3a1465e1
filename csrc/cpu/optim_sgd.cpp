// Multi-tensor SGD step on the CPU: the shared element-wise frame
// (dlopt/cpu_elementwise.h) around the per-element maths in dlopt/sgd_math.h. SGD keeps
// no step count.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <type_traits>

#include "dlopt/cpu_elementwise.h"
#include "dlopt/sgd_math.h"

namespace dlopt {
namespace {

// MOMENTUM: 0 none, 1 heavy ball, 2 Nesterov. FIRST: the buffer becomes the grad (it is
// written, not read).
// C: the arithmetic's type (fp32; double for float64 params).
template <bool WD, int MOMENTUM, bool FIRST, class C>
struct SgdOp {
  using Coeffs = SgdCoeffsOf<C>;
  static constexpr unsigned kReads = (MOMENTUM != 0 && !FIRST) ? 1u : 0u;  // momentum_buffer
  static constexpr unsigned kWrites = MOMENTUM != 0 ? 1u : 0u;
  static DLOPT_HD void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c) {
    sgd_update<WD, MOMENTUM != 0, MOMENTUM == 2>(p, g, s[0], FIRST, c);
  }
};

template <class P, class S, Store STORE, bool WD>
StepChunkFn<SgdCoeffsOf<typename P::C>> pick_momentum(int momentum, bool first) {
  using C = typename P::C;
  switch (momentum) {
    case 0: return &step_chunk<SgdOp<WD, 0, false, C>, P, S, STORE>;
    case 1: return first ? &step_chunk<SgdOp<WD, 1, true, C>, P, S, STORE>
                         : &step_chunk<SgdOp<WD, 1, false, C>, P, S, STORE>;
    default: return first ? &step_chunk<SgdOp<WD, 2, true, C>, P, S, STORE>
                          : &step_chunk<SgdOp<WD, 2, false, C>, P, S, STORE>;
  }
}

template <class P, class S, Store STORE>
struct PickSgd {
  static StepChunkFn<SgdCoeffsOf<typename P::C>> get(bool wd, int momentum, bool first) {
    return wd ? pick_momentum<P, S, STORE, true>(momentum, first)
              : pick_momentum<P, S, STORE, false>(momentum, first);
  }
};

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList master_params, const at::Tensor& lr, double weight_decay,
                  double momentum, double dampening, bool nesterov, bool maximize,
                  c10::List<bool> new_buffers, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf,
                  const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const bool use_momentum = momentum != 0.0;
  const at::TensorList P = params;
  const at::TensorList bufs = use_momentum ? momentum_buffers : at::TensorList();
  std::vector<NamedList> states;
  if (use_momentum) states.push_back({"momentum_buffers", bufs});
  check_elementwise_lists(P, grads, states, master_params, {}, sr_seed.has_value(),
                          /*has_steps=*/false);
  TORCH_CHECK(new_buffers.empty() || new_buffers.size() == n, "dlopt: new_buffers has ",
              new_buffers.size(), " entries but params has ", n);
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::sgd_step (cpu): params[", i, "] is on ",
                P[i].device());
  if (n == 0) return;
  if (skip_step(found_inf)) return;  // GradScaler found an inf/NaN: nothing changes
  const bool use_master = !master_params.empty();
  const Store store = store_mode(use_master, sr_seed.has_value());
  const double lr_v = scalar_value(lr, "lr");
  const int mode = !use_momentum ? 0 : (nesterov ? 2 : 1);
  const bool wide = float64_call(P, {bufs}, use_master);

  AlignedLists L({P, grads, bufs, master_params}, {true, false, true, true});
  run_step_for<SgdCoeffsOf>(wide, L, 1, use_master, sr_seed_value(sr_seed),
                            grad_multiplier(maximize, grad_scale), [&](size_t i, auto& a) {
                              using C = typename std::decay_t<decltype(a.c)>::Compute;
                              a.c = sgd_coeffs<C>(lr_v, weight_decay, momentum, dampening);
                              const bool first =
                                  use_momentum && !new_buffers.empty() && new_buffers.get(i);
                              const auto st = use_momentum ? L[2][i].scalar_type() : at::kFloat;
                              return pick_storage_for<PickSgd, C>(L[0][i].scalar_type(), st,
                                                                  store, weight_decay != 0.0,
                                                                  mode, first);
                            });
  for (auto list : {params, bufs, master_params}) bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!)[] master_params, Tensor lr, float weight_decay, float momentum, "
      "float dampening, bool nesterov, bool maximize, bool[] new_buffers, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("sgd_step", &sgd_step_cpu); }

}  // namespace dlopt
