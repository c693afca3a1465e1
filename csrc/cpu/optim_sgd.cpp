// Multi-tensor SGD step on the CPU: one parallel region over 32K-element chunks of
// every tensor in the list, each chunk one vectorizable loop calling the shared
// per-element maths in dlopt/sgd_math.h. SGD keeps no step count.
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rounding.h"
#include "dlopt/sgd_math.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct SgdTensorArgs {
  void* p;
  const void* g;
  void* buf;
  float* master;
  SgdCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

using ChunkFn = void (*)(const SgdTensorArgs&, int64_t, int64_t);

// MOMENTUM: 0 none, 1 heavy ball, 2 Nesterov. FIRST: the buffer becomes the grad.
template <class P, class S, Store STORE, bool WD, int MOMENTUM, bool FIRST>
void sgd_chunk(const SgdTensorArgs& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ buf = ck.offset(static_cast<typename S::T*>(a.buf));
  float* __restrict__ master = ck.offset(a.master);
  const SgdCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, g, MOMENTUM != 0 ? buf : nullptr, master);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      float pf = load_param<P, STORE>(p, master, i);
      float bf = (MOMENTUM != 0 && !FIRST) ? S::load(buf[i]) : 0.f;
      sgd_update<WD, MOMENTUM != 0, MOMENTUM == 2>(pf, P::load(g[i]) * grad_mul, bf, FIRST, c);
      if (MOMENTUM != 0) buf[i] = S::store(bf);
      write_param<P, STORE>(p, master, pf, key, i, ck.base);
    }
  }
}

template <class P, class S, Store STORE, bool WD>
ChunkFn pick_momentum(int momentum, bool first) {
  switch (momentum) {
    case 0: return &sgd_chunk<P, S, STORE, WD, 0, false>;
    case 1: return first ? &sgd_chunk<P, S, STORE, WD, 1, true> : &sgd_chunk<P, S, STORE, WD, 1, false>;
    default: return first ? &sgd_chunk<P, S, STORE, WD, 2, true> : &sgd_chunk<P, S, STORE, WD, 2, false>;
  }
}

template <class P, class S, Store STORE>
struct PickSgd {
  static ChunkFn get(bool wd, int momentum, bool first) {
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
  const bool use_sr = sr_seed.has_value();
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double grad_mul = grad_multiplier(maximize, grad_scale);
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;
  const SgdCoeffs c = sgd_coeffs(scalar_value(lr, "lr"), weight_decay, momentum, dampening);
  const int mode = !use_momentum ? 0 : (nesterov ? 2 : 1);

  AlignedLists L({P, grads, bufs, master_params}, {true, false, true, true});

  std::vector<SgdTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    SgdTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.buf = use_momentum ? L[2][i].data_ptr() : nullptr;
    a.master = use_master ? L[3][i].data_ptr<float>() : nullptr;
    a.c = c;
    a.grad_mul = static_cast<float>(grad_mul);
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    const bool first = use_momentum && !new_buffers.empty() && new_buffers.get(i);
    const auto st = use_momentum ? L[2][i].scalar_type() : at::kFloat;
    fns[i] = pick_storage<PickSgd>(L[0][i].scalar_type(), st, store, weight_decay != 0.0, mode,
                                   first);
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
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
