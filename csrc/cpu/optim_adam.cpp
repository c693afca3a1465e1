// Multi-tensor Adam / AdamW step on the CPU: one parallel region over 32K-element
// chunks of every tensor in the list, each chunk one vectorizable loop calling
// the shared per-element maths in dlopt/adam_math.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/adam_math.h"
#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct AdamTensorArgs {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  float* master;
  AdamCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

using ChunkFn = void (*)(const AdamTensorArgs&, int64_t, int64_t);

enum class WeightDecay { kNone, kL2, kDecoupled };

template <class P, class S, Store STORE, WeightDecay WD, bool AMSGRAD>
void adam_chunk(const AdamTensorArgs& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* __restrict__ p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* __restrict__ g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* __restrict__ m = ck.offset(static_cast<typename S::T*>(a.m));
  auto* __restrict__ v = ck.offset(static_cast<typename S::T*>(a.v));
  auto* __restrict__ vmax = ck.offset(static_cast<typename S::T*>(a.vmax));
  float* __restrict__ master = ck.offset(a.master);
  const AdamCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
    prefetch_ahead(lo, p, g, m, v, vmax, master);
    for (int32_t i = lo, hi = ck.block_end(lo); i < hi; ++i) {
      float pf = (STORE == Store::kMaster) ? master[i] : P::load(p[i]);
      float mf = S::load(m[i]);
      float vf = S::load(v[i]);
      float vmf = AMSGRAD ? S::load(vmax[i]) : 0.f;
      adam_update<WD == WeightDecay::kDecoupled, AMSGRAD, WD != WeightDecay::kNone>(
          pf, P::load(g[i]) * grad_mul, mf, vf, vmf, c);
      m[i] = S::store(mf);
      v[i] = S::store(vf);
      if (AMSGRAD) vmax[i] = S::store(vmf);
      if (STORE == Store::kMaster) master[i] = pf;
      p[i] = store_param<P, STORE>(pf, key, ck.base + static_cast<uint32_t>(i));
    }
  }
}

template <class P, class S, Store STORE>
struct PickAdam {
  static ChunkFn get(WeightDecay wd, bool amsgrad) {
    switch (wd) {
      case WeightDecay::kNone:
        return amsgrad ? &adam_chunk<P, S, STORE, WeightDecay::kNone, true>
                       : &adam_chunk<P, S, STORE, WeightDecay::kNone, false>;
      case WeightDecay::kL2:
        return amsgrad ? &adam_chunk<P, S, STORE, WeightDecay::kL2, true>
                       : &adam_chunk<P, S, STORE, WeightDecay::kL2, false>;
      default:
        return amsgrad ? &adam_chunk<P, S, STORE, WeightDecay::kDecoupled, true>
                       : &adam_chunk<P, S, STORE, WeightDecay::kDecoupled, false>;
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
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double lr_v = scalar_value(lr, "lr");
  const double grad_mul = grad_multiplier(maximize, grad_scale);
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;
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

  AlignedLists L({P, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params},
                 {true, false, true, true, true, true});

  std::vector<AdamTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const double step = increment_step(state_steps[i]);
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    AdamTensorArgs& a = args[i];
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    a.m = L[2][i].data_ptr();
    a.v = L[3][i].data_ptr();
    a.vmax = amsgrad ? L[4][i].data_ptr() : nullptr;
    a.master = use_master ? L[5][i].data_ptr<float>() : nullptr;
    a.c = adam_coeffs(lr_v, step, beta1, beta2, weight_decay, eps);
    a.grad_mul = static_cast<float>(grad_mul);
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    fns[i] = pick_storage<PickAdam>(L[0][i].scalar_type(), L[2][i].scalar_type(), store, wd,
                                    amsgrad);
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
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
