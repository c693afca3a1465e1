// Multi-tensor LAMB step on the CPU (maths: dlopt/lamb_math.h), in two parallel
// regions over 32K-element chunks, per group of tensors small enough to stay in the
// cache between the two:
//   1. moments: m, v updated; per chunk, sum p^2 and sum u^2 (fp32 partials of 8 terms
//      added in double; u the LAMB direction, computed from m and v as stored);
//   2. apply: per tensor the trust ratio from its chunks' sums (combined in chunk
//      order on one thread, so results do not depend on the thread count), then
//      p -= lr * trust * u, u stored by pass 1 (or, for a tensor larger than a group,
//      recomputed from the stored m, v).
// 24 + 16 bytes per fp32 param: read p, g, m, v, write m, v; read p, m, v, write p.
// The arithmetic is fp32, or double for a float64 call (float64 params and states
// only: the chunk functions' C, coeffs<C>()).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/lamb_math.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct LambTensorArgs {
  void* p;
  const void* g;
  void* m;
  void* v;
  float* master;
  // The coefficients in the arithmetic's type C (fp32; double for float64 params):
  // coeffs<C>(), the one of the call's type set.
  AdamCoeffsOf<float> c32;
  AdamCoeffsOf<double> c64;
  double grad_mul;  // 1 / grad_scale * clip factor (rounded to C where it is used)
  uint32_t sr_key;
  void* u;  // scratch of C for the direction u between the passes (nullptr: pass 2
            // recomputes it)
  template <class C>
  const AdamCoeffsOf<C>& coeffs() const {
    if constexpr (std::is_same_v<C, double>) return c64;
    else return c32;
  }
};

// (apply's scale: lr * trust ratio in double, rounded to C once in the chunk)
using MomentsFn = void (*)(const LambTensorArgs&, int64_t, int64_t, double*);
using ApplyFn = void (*)(const LambTensorArgs&, double, int64_t, int64_t);

struct LambFns {
  MomentsFn moments;
  ApplyFn apply;
};

// Pass 1 over one chunk: updates m and v; out[0], out[1] = sum of p^2, sum of u^2 (u the
// LAMB direction from the new moments). The sums are fp32 partials of 8 terms per lane,
// widened to double every 128 elements, as in multi_tensor_norm.cpp: widening every
// element kept this loop from vectorizing at all. A non-finite sum (a square above
// FLT_MAX) is recomputed in double from the updated m and v (u depends only on them
// and p, which this pass does not change).
template <class P, class S, Store STORE, bool WD>
void lamb_moments_chunk(const LambTensorArgs& a, int64_t begin, int64_t end, double* out) {
  using C = typename P::C;  // the arithmetic's type
  const ChunkLoop ck(begin, end);
  const auto* __restrict__ p = ck.offset(static_cast<const typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ m = ck.offset(static_cast<typename S::T*>(a.m));
  auto* __restrict__ v = ck.offset(static_cast<typename S::T*>(a.v));
  const float* __restrict__ master = ck.offset(static_cast<const float*>(a.master));
  const AdamCoeffsOf<C> c = a.coeffs<C>();
  const C grad_mul = static_cast<C>(a.grad_mul);
  C* __restrict__ u_out = ck.offset(static_cast<C*>(a.u));
  // One element: new moments stored (and u, with store_u); returns p (fp32) and u.
  // Returned by value: with `float&` out-parameters, gcc's `omp simd` lowering kept
  // them in per-lane arrays and vectorized the loop below with gathers and masked
  // scatters (seen in the disassembly), at about half the speed of plain loads.
  struct PU {
    C p, u;
  };
  // k as a 64-bit row start plus the lane: with one 32-bit index, gcc's `omp simd`
  // lowering could not prove the lanes contiguous and gathered every load.
  auto one = [&](auto store_u, int64_t row, int j) -> PU {
    const int64_t k = row + j;
    const C pf = load_param<P, STORE>(p, master, k);
    C mf = S::load(m[k]);
    C vf = S::load(v[k]);
    adam_moments(P::load(g[k]) * grad_mul, mf, vf, c);
    const typename S::T ms = S::store(mf);
    const typename S::T vs = S::store(vf);
    m[k] = ms;
    v[k] = vs;
    const C u = lamb_direction<WD>(pf, S::load(ms), S::load(vs), c);
    if constexpr (decltype(store_u)::value) u_out[k] = u;
    return {pf, u};
  };
  double sp = 0.0, su = 0.0;
  auto run = [&](auto store_u) {
    constexpr int kLanes = 16, kRows = 8;
    double pp[kLanes] = {}, uu[kLanes] = {};
    int32_t i = 0;
    for (; i + kLanes * kRows <= ck.len; i += kLanes * kRows) {
      C ps[kLanes] = {}, us[kLanes] = {};
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = i + r * kLanes;
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const PU e = one(store_u, row, j);
          ps[j] += e.p * e.p;
          us[j] += e.u * e.u;
        }
      }
      for (int j = 0; j < kLanes; ++j) {
        pp[j] += ps[j];
        uu[j] += us[j];
      }
    }
    for (; i < ck.len; ++i) {
      const PU e = one(store_u, i, 0);
      sp += static_cast<double>(e.p) * e.p;
      su += static_cast<double>(e.u) * e.u;
    }
    for (int j = 0; j < kLanes; ++j) {
      sp += pp[j];
      su += uu[j];
    }
  };
  if (u_out)
    run(std::true_type{});
  else
    run(std::false_type{});
  if (!std::isfinite(sp) || !std::isfinite(su)) {  // overflowed fp32 partials: redo in double
    sp = su = 0.0;
    for (int32_t k = 0; k < ck.len; ++k) {
      const C pf = load_param<P, STORE>(p, master, k);
      const C u = lamb_direction<WD>(pf, S::load(m[k]), S::load(v[k]), c);
      sp += static_cast<double>(pf) * pf;
      su += static_cast<double>(u) * u;
    }
  }
  out[0] = sp;
  out[1] = su;
}

template <class P, class S, Store STORE, bool WD>
void lamb_apply_chunk(const LambTensorArgs& a, double scale_d, int64_t begin, int64_t end) {
  using C = typename P::C;
  const C scale = static_cast<C>(scale_d);
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ m = ck.offset(static_cast<const typename S::T*>(a.m));
  const auto* __restrict__ v = ck.offset(static_cast<const typename S::T*>(a.v));
  float* __restrict__ master = ck.offset(a.master);
  const C* __restrict__ u_in = ck.offset(static_cast<const C*>(a.u));
  const AdamCoeffsOf<C> c = a.coeffs<C>();
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, u_in ? nullptr : m, u_in ? nullptr : v, master, u_in);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      C pf = load_param<P, STORE>(p, master, i);
      // the same value pass 1 stored: both compute it from the stored m, v
      const C u = u_in ? u_in[i] : lamb_direction<WD>(pf, S::load(m[i]), S::load(v[i]), c);
      pf = pf - scale * u;
      write_param<P, STORE>(p, master, pf, key, i, ck.base);
    }
  }
}

template <class P, class S, Store STORE>
struct PickLamb {
  static LambFns get(bool wd) {
    if (wd) return {&lamb_moments_chunk<P, S, STORE, true>, &lamb_apply_chunk<P, S, STORE, true>};
    return {&lamb_moments_chunk<P, S, STORE, false>, &lamb_apply_chunk<P, S, STORE, false>};
  }
};

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList master_params,
                   at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                   double weight_decay, double eps, bool bias_correction, double max_grad_norm,
                   const std::optional<at::Tensor>& global_grad_norm,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const at::TensorList P = params;
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_elementwise_lists(P, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                          master_params, state_steps, use_sr);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::lamb_step (cpu): params[", i, "] is on ",
                P[i].device());
    check_step_tensor(state_steps[i], i);
  }
  TORCH_CHECK(max_grad_norm <= 0.0 || global_grad_norm.has_value(),
              "dlopt::lamb_step: max_grad_norm > 0 needs global_grad_norm");
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included.
  if (skip_step(found_inf)) return;
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double lr_v = scalar_value(lr, "lr");
  const double unscale = grad_multiplier(false, grad_scale);
  const double clip = max_grad_norm > 0.0
      ? lamb_clip_factor(scalar_value(*global_grad_norm, "global_grad_norm") * unscale,
                         max_grad_norm)
      : 1.0;
  const double grad_mul = unscale * clip;
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;

  // A float64 call: float64 params and states only, computed in double (a TypeError
  // otherwise, before anything is written).
  const bool wide = float64_call(P, {exp_avgs, exp_avg_sqs}, use_master);
  AlignedLists L({P, grads, exp_avgs, exp_avg_sqs, master_params}, {true, false, true, true, true});
  std::vector<LambTensorArgs> args(n);
  std::vector<LambFns> fns(n);
  std::vector<int64_t> numels(n), chunk_base(n + 1, 0), bytes_per_elem(n);
  for (size_t i = 0; i < n; ++i) {
    const double step = increment_step(state_steps[i]);
    numels[i] = L[0][i].numel();
    bytes_per_elem[i] = 2 * L[0][i].element_size() + 2 * L[2][i].element_size() +
                        (use_master ? 4 : 0);
    chunk_base[i + 1] = chunk_base[i] + (numels[i] + kCpuChunk - 1) / kCpuChunk;
    if (numels[i] == 0) continue;
    LambTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.m = L[2][i].data_ptr();
    a.v = L[3][i].data_ptr();
    a.master = use_master ? L[4][i].data_ptr<float>() : nullptr;
    if (wide)
      a.c64 = lamb_coeffs<double>(step, beta1, beta2, weight_decay, eps, bias_correction);
    else
      a.c32 = lamb_coeffs<float>(step, beta1, beta2, weight_decay, eps, bias_correction);
    a.grad_mul = grad_mul;
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    fns[i] = wide ? pick_storage_for<PickLamb, double>(L[0][i].scalar_type(),
                                                       L[2][i].scalar_type(), store,
                                                       weight_decay != 0.0)
                  : pick_storage<PickLamb>(L[0][i].scalar_type(), L[2][i].scalar_type(), store,
                                           weight_decay != 0.0);
  }
  // Both passes run per group of consecutive tensors of at most kGroupBytes (a larger
  // tensor is a group alone), so pass 2 finds the group's p, m, v still in the cache.
  constexpr int64_t kGroupBytes = 32 << 20;
  std::vector<double> partials(2 * static_cast<size_t>(chunk_base[n]));
  std::vector<double> scales(n);
  std::vector<int64_t> group_numels(n, 0);
  // Within a group that fits the cache, pass 1 also stores u (4 B per element, reused
  // across calls) so pass 2 skips its sqrt and division; a tensor larger than a group
  // recomputes u instead (no scratch as large as the model).
  static thread_local std::vector<float> u_scratch;
  static thread_local std::vector<double> u_scratch64;
  for (size_t g0 = 0; g0 < n;) {
    size_t g1 = g0;
    int64_t bytes = 0, group_elems = 0;
    while (g1 < n && (g1 == g0 || bytes + numels[g1] * bytes_per_elem[g1] <= kGroupBytes)) {
      bytes += numels[g1] * bytes_per_elem[g1];
      group_elems += numels[g1];
      group_numels[g1] = numels[g1];
      ++g1;
    }
    if (bytes <= kGroupBytes) {
      const size_t need = static_cast<size_t>(group_elems);  // grows, never shrinks
      if (wide)
        u_scratch64.resize(std::max(u_scratch64.size(), need));
      else
        u_scratch.resize(std::max(u_scratch.size(), need));
      for (size_t i = g0, off = 0; i < g1; off += numels[i], ++i)
        args[i].u = !numels[i] ? nullptr
                    : wide     ? static_cast<void*>(u_scratch64.data() + off)
                               : static_cast<void*>(u_scratch.data() + off);
    }
    // Pass 1: moments and per-chunk sums of p^2, u^2.
    for_each_chunk(group_numels, [&](int32_t t, int64_t b, int64_t e) {
      fns[t].moments(args[t], b, e, &partials[2 * (chunk_base[t] + b / kCpuChunk)]);
    });
    // Trust ratios, then pass 2.
    for (size_t i = g0; i < g1; ++i) {
      double pp = 0.0, uu = 0.0;
      for (int64_t c = chunk_base[i]; c < chunk_base[i + 1]; ++c) {
        pp += partials[2 * c];
        uu += partials[2 * c + 1];
      }
      scales[i] = lr_v * lamb_trust_ratio(std::sqrt(pp), std::sqrt(uu));
    }
    for_each_chunk(group_numels, [&](int32_t t, int64_t b, int64_t e) {
      fns[t].apply(args[t], scales[t], b, e);
    });
    for (size_t i = g0; i < g1; ++i) group_numels[i] = 0;
    g0 = g1;
  }
  L.finish();
  for (auto list : {params, exp_avgs, exp_avg_sqs, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "lamb_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] master_params, Tensor(e!)[] state_steps, "
      "Tensor lr, float beta1, float beta2, float weight_decay, float eps, "
      "bool bias_correction, float max_grad_norm, Tensor? global_grad_norm, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("lamb_step", &lamb_step_cpu); }

}  // namespace dlopt
