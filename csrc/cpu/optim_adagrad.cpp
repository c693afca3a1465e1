// Multi-tensor Adagrad step on the CPU: one parallel region over 32K-element chunks of
// every tensor in the list, each chunk one vectorizable loop calling the shared
// per-element maths in dlopt/adagrad_math.h.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/adagrad_math.h"
#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct AdagradTensorArgs {
  void* p;
  const void* g;
  void* sum;
  float* master;
  AdagradCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

using ChunkFn = void (*)(const AdagradTensorArgs&, int64_t, int64_t);

template <class P, class S, Store STORE, bool WD>
void adagrad_chunk(const AdagradTensorArgs& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ sum = ck.offset(static_cast<typename S::T*>(a.sum));
  float* __restrict__ master = ck.offset(a.master);
  const AdagradCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, g, sum, master);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      float pf = load_param<P, STORE>(p, master, i);
      float sf = S::load(sum[i]);
      adagrad_update<WD>(pf, P::load(g[i]) * grad_mul, sf, c);
      sum[i] = S::store(sf);
      write_param<P, STORE>(p, master, pf, key, i, ck.base);
    }
  }
}

template <class P, class S, Store STORE>
struct PickAdagrad {
  static ChunkFn get(bool wd) {
    return wd ? &adagrad_chunk<P, S, STORE, true> : &adagrad_chunk<P, S, STORE, false>;
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
  const bool use_sr = sr_seed.has_value();
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double lr_v = scalar_value(lr, "lr");
  const double grad_mul = grad_multiplier(maximize, grad_scale);
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;

  AlignedLists L({P, grads, state_sums, master_params}, {true, false, true, true});
  std::vector<AdagradTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const double step = increment_step(state_steps[i]);
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    AdagradTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.sum = L[2][i].data_ptr();
    a.master = use_master ? L[3][i].data_ptr<float>() : nullptr;
    a.c = adagrad_coeffs(lr_v, step, lr_decay, weight_decay, eps);
    a.grad_mul = static_cast<float>(grad_mul);
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    fns[i] = pick_storage<PickAdagrad>(L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                       weight_decay != 0.0);
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
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
