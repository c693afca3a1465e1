// Multi-tensor RMSprop step on the CPU: one parallel region over 32K-element chunks of
// every tensor in the list, each chunk one vectorizable loop calling the shared
// per-element maths in dlopt/rmsprop_math.h. RMSprop's maths does not use the step
// count; it is counted as torch's state keeps it.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rmsprop_math.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct RmspropTensorArgs {
  void* p;
  const void* g;
  void* v;
  void* ga;
  void* buf;
  float* master;
  RmspropCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

using ChunkFn = void (*)(const RmspropTensorArgs&, int64_t, int64_t);

template <class P, class S, Store STORE, bool WD, bool CENTERED, bool MOMENTUM>
void rmsprop_chunk(const RmspropTensorArgs& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ v = ck.offset(static_cast<typename S::T*>(a.v));
  auto* __restrict__ ga = ck.offset(static_cast<typename S::T*>(a.ga));
  auto* __restrict__ buf = ck.offset(static_cast<typename S::T*>(a.buf));
  float* __restrict__ master = ck.offset(a.master);
  const RmspropCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, g, v, CENTERED ? ga : nullptr, MOMENTUM ? buf : nullptr, master);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      float pf = load_param<P, STORE>(p, master, i);
      float vf = S::load(v[i]);
      float gaf = CENTERED ? S::load(ga[i]) : 0.f;
      float bf = MOMENTUM ? S::load(buf[i]) : 0.f;
      rmsprop_update<WD, CENTERED, MOMENTUM>(pf, P::load(g[i]) * grad_mul, vf, gaf, bf, c);
      v[i] = S::store(vf);
      if (CENTERED) ga[i] = S::store(gaf);
      if (MOMENTUM) buf[i] = S::store(bf);
      write_param<P, STORE>(p, master, pf, key, i, ck.base);
    }
  }
}

template <class P, class S, Store STORE, bool WD>
ChunkFn pick_variant(bool centered, bool momentum) {
  if (centered)
    return momentum ? &rmsprop_chunk<P, S, STORE, WD, true, true>
                    : &rmsprop_chunk<P, S, STORE, WD, true, false>;
  return momentum ? &rmsprop_chunk<P, S, STORE, WD, false, true>
                  : &rmsprop_chunk<P, S, STORE, WD, false, false>;
}

template <class P, class S, Store STORE>
struct PickRmsprop {
  static ChunkFn get(bool wd, bool centered, bool momentum) {
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
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const RmspropCoeffs c =
      rmsprop_coeffs(scalar_value(lr, "lr"), alpha, eps, weight_decay, momentum);
  const double grad_mul = grad_multiplier(maximize, grad_scale);
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;

  AlignedLists L({P, grads, square_avgs, gas, bufs, master_params},
                 {true, false, true, true, true, true});
  std::vector<RmspropTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    increment_step(state_steps[i]);
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    RmspropTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.v = L[2][i].data_ptr();
    a.ga = centered ? L[3][i].data_ptr() : nullptr;
    a.buf = use_momentum ? L[4][i].data_ptr() : nullptr;
    a.master = use_master ? L[5][i].data_ptr<float>() : nullptr;
    a.c = c;
    a.grad_mul = static_cast<float>(grad_mul);
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    fns[i] = pick_storage<PickRmsprop>(L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                       weight_decay != 0.0, centered, use_momentum);
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
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
