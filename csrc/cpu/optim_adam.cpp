// Multi-tensor Adam / AdamW step on the CPU: one parallel region over 32K-element
// chunks of every tensor in the list, each chunk one vectorizable loop calling
// the shared per-element maths in dlopt/adam_math.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "dlopt/adam_math.h"
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
  auto* __restrict__ p = static_cast<typename P::T*>(a.p);
  const auto* __restrict__ g = static_cast<const typename P::T*>(a.g);
  auto* __restrict__ m = static_cast<typename S::T*>(a.m);
  auto* __restrict__ v = static_cast<typename S::T*>(a.v);
  auto* __restrict__ vmax = static_cast<typename S::T*>(a.vmax);
  float* __restrict__ master = a.master;
  const AdamCoeffs c = a.c;
  const float grad_mul = a.grad_mul;
  const uint32_t key = a.sr_key;
  for (int64_t i = begin; i < end; ++i) {
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
    p[i] = store_param<P, STORE>(pf, key, i);
  }
}

template <class P, class S, Store STORE>
ChunkFn pick_flags(WeightDecay wd, bool amsgrad) {
#define DLOPT_WD_CASE(W)                                                               \
  case W:                                                                              \
    return amsgrad ? &adam_chunk<P, S, STORE, W, true> : &adam_chunk<P, S, STORE, W, false>;
  switch (wd) {
    DLOPT_WD_CASE(WeightDecay::kNone)
    DLOPT_WD_CASE(WeightDecay::kL2)
    DLOPT_WD_CASE(WeightDecay::kDecoupled)
  }
#undef DLOPT_WD_CASE
  return nullptr;
}

ChunkFn pick_kernel(at::ScalarType pt, at::ScalarType st, Store store, WeightDecay wd, bool ams) {
  const bool f32_state = st == at::kFloat;
  switch (pt) {
    case at::kFloat:  // fp32 params: stochastic rounding is moot; a master copy is honoured
      return store == Store::kMaster ? pick_flags<F32, F32, Store::kMaster>(wd, ams)
                                     : pick_flags<F32, F32, Store::kNearest>(wd, ams);
    case at::kBFloat16:
      if (store == Store::kMaster) return pick_flags<BF16, F32, Store::kMaster>(wd, ams);
      if (store == Store::kStochastic)
        return f32_state ? pick_flags<BF16, F32, Store::kStochastic>(wd, ams)
                         : pick_flags<BF16, BF16, Store::kStochastic>(wd, ams);
      return f32_state ? pick_flags<BF16, F32, Store::kNearest>(wd, ams)
                       : pick_flags<BF16, BF16, Store::kNearest>(wd, ams);
    case at::kHalf:
      if (store == Store::kMaster) return pick_flags<F16, F32, Store::kMaster>(wd, ams);
      return f32_state ? pick_flags<F16, F32, Store::kNearest>(wd, ams)
                       : pick_flags<F16, F16, Store::kNearest>(wd, ams);
    default:
      TORCH_CHECK(false, "dlopt::adam_step: unsupported param dtype ", pt);
  }
}

constexpr int64_t kChunk = 32768;

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList master_params, at::TensorList state_steps, const at::Tensor& lr,
                   double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                   bool maximize, bool decoupled_weight_decay,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  std::vector<at::Tensor> P(params.begin(), params.end());
  check_same_length(P, grads.vec(), "grads", false);
  check_same_length(P, exp_avgs.vec(), "exp_avgs", false);
  check_same_length(P, exp_avg_sqs.vec(), "exp_avg_sqs", false);
  check_same_length(P, max_exp_avg_sqs.vec(), "max_exp_avg_sqs", !amsgrad);
  check_same_length(P, master_params.vec(), "master_params", true);
  check_same_length(P, state_steps.vec(), "state_steps", false);
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "dlopt: amsgrad needs max_exp_avg_sqs");
  if (n == 0) return;
  // GradScaler found an inf/NaN: the whole step is skipped, steps included
  // (torch increments then subtracts found_inf: same end state).
  if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double lr_v = lr.item<double>();
  double grad_mul = maximize ? -1.0 : 1.0;
  if (grad_scale.has_value()) grad_mul /= grad_scale->item<double>();
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
    const at::Tensor& s = state_steps[i];
    TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
                "dlopt: state_steps[", i, "] must be a one-element float32/float64 CPU tensor");
  }

  AlignedLists L({P, grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), max_exp_avg_sqs.vec(),
                  master_params.vec()},
                 {true, false, true, true, true, true});

  std::vector<AdamTensorArgs> args(n);
  std::vector<ChunkFn> fns(n);
  struct Chunk { int32_t t; int64_t begin, end; };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& s = state_steps[i];
    double step;
    if (s.scalar_type() == at::kFloat) {
      float* sp = s.data_ptr<float>();
      step = static_cast<double>(*sp += 1.0f);
    } else {
      double* sp = s.data_ptr<double>();
      step = (*sp += 1.0);
    }
    const int64_t numel = L[0][i].numel();
    if (numel == 0) continue;
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
    const at::ScalarType pt = L[0][i].scalar_type();
    fns[i] = pick_kernel(pt, L[2][i].scalar_type(), store, wd, amsgrad);
    for (int64_t b = 0; b < numel; b += kChunk)
      chunks.push_back({static_cast<int32_t>(i), b, std::min(numel, b + kChunk)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const Chunk& ch = chunks[k];
      fns[ch.t](args[ch.t], ch.begin, ch.end);
    }
  });
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
