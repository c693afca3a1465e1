// Multi-tensor Adam / AdamW step on CUDA; same semantics as csrc/cpu/optim_adam.cpp.
//
// Two phases, both on the current stream and free of host syncs (so the step
// can be captured in a CUDA graph):
//   1. adam_prepare_kernel, one thread per tensor: unless found_inf is set,
//      increments the tensor's step in device memory and writes its
//      coefficients (adam_coeffs from its own step, grad_mul, SR key) to a
//      scratch buffer.
//   2. multi_tensor_apply with AdamOp, one launch series per (param dtype,
//      state dtype) group: each block re-reads found_inf (skip), takes its
//      tensor's coefficients and calls the shared adam_update.
// lr, grad_scale, found_inf and sr_seed may live on the params' GPU (read by
// the kernels) or on the CPU (read here on the host, which needs no sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dlopt/adam_math.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

// Per-tensor values produced by phase 1 and read by every block of phase 2.
struct AdamTensorCoeffs {
  AdamCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

struct AdamHyper {
  ScalarRef lr, grad_scale, found_inf, seed;
  double beta1, beta2, weight_decay, eps;
  bool maximize;
};

using cuda::skip_step;  // NaN counts as found, as on the CPU

// ---- phase 1: steps and coefficients -------------------------------------------------

using cuda::StepBatch;  // dlopt/cuda_steps.cuh
static_assert(sizeof(StepBatch) + sizeof(AdamHyper) + sizeof(void*) <= 4096,
              "adam_prepare_kernel arguments over 4 KB");

// Thread k of the batch (host-callable, like mta::run_thread, for CPU emulation).
DLOPT_HD void adam_prepare_one(const StepBatch& b, const AdamHyper& h, AdamTensorCoeffs* out,
                               int k) {
  if (k >= b.count || skip_step(h.found_inf)) return;
  const double step = cuda::bump_step(b, k);  // float32 steps count in float, as the CPU
  const int32_t i = b.first + k;
  AdamTensorCoeffs r;
  r.c = adam_coeffs(cuda::load_f64(h.lr), step, h.beta1, h.beta2, h.weight_decay, h.eps);
  r.grad_mul = static_cast<float>((h.maximize ? -1.0 : 1.0) / cuda::load_f64(h.grad_scale));
  const auto seed = static_cast<uint32_t>(cuda::load_i64(h.seed));  // low 32 bits, as the CPU
  r.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
  out[i] = r;
}

__global__ void adam_prepare_kernel(const __grid_constant__ StepBatch b,
                                    const __grid_constant__ AdamHyper h, AdamTensorCoeffs* out) {
  adam_prepare_one(b, h, out, blockIdx.x * blockDim.x + threadIdx.x);
}

// ---- phase 2: the element-wise update ------------------------------------------------

enum class WeightDecay : int32_t { kNone, kL2, kDecoupled };
using cuda::StoreMode;

enum : int { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaster, kNumLists };

struct AdamShared {
  ScalarRef found_inf;
  const AdamTensorCoeffs* coeffs;
  WeightDecay wd;  // uniform per launch: a runtime switch keeps the kernel count down
};

// PS: param storage (its store may round stochastically), S: state storage.
template <class PS, class S, bool MASTER, bool AMSGRAD>
struct AdamOp : AdamShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::Access<PS, mta::kRead>,                                // grad
                    mta::Access<S, mta::kReadWrite>,                            // exp_avg
                    mta::Access<S, mta::kReadWrite>,                            // exp_avg_sq
                    std::conditional_t<AMSGRAD, mta::Access<S, mta::kReadWrite>, mta::NoAccess>,
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = int32_t;  // global tensor index
  using Block = AdamTensorCoeffs;

  DLOPT_HD bool begin(const Meta& i, Block& b) const {
    if (skip_step(found_inf)) return false;
    b = coeffs[i];
    return true;
  }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    const float g = x[kGrad] * b.grad_mul;
    switch (wd) {
      case WeightDecay::kNone:
        adam_update<false, AMSGRAD, false>(p, g, x[kExpAvg], x[kExpAvgSq], x[kMaxExpAvgSq], b.c);
        break;
      case WeightDecay::kL2:
        adam_update<false, AMSGRAD, true>(p, g, x[kExpAvg], x[kExpAvgSq], x[kMaxExpAvgSq], b.c);
        break;
      case WeightDecay::kDecoupled:
        adam_update<true, AMSGRAD, true>(p, g, x[kExpAvg], x[kExpAvgSq], x[kMaxExpAvgSq], b.c);
        break;
    }
    if (MASTER) x[kParam] = x[kMaster];
  }
};

using Entries = std::vector<mta::TensorEntry<kNumLists, int32_t>>;
using Launcher = void (*)(const Entries&, const AdamShared&);

template <class Op>
void launch(const Entries& entries, const AdamShared& shared) {
  mta::multi_tensor_apply(entries, Op{shared});
}

// The same choice as the CPU kernel's (cuda::pick_storage, dlopt/cuda_storage.cuh).
template <class PS, class S, bool MASTER>
struct PickAdam {
  static Launcher get(bool amsgrad) {
    return amsgrad ? &launch<AdamOp<PS, S, MASTER, true>> : &launch<AdamOp<PS, S, MASTER, false>>;
  }
};

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "dlopt: too many tensors");
  const c10::Device device = P[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::adam_step (cuda): params[0] is on ", device);
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  const StoreMode store =
      use_master ? StoreMode::kMaster : (use_sr ? StoreMode::kStochastic : StoreMode::kNearest);
  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled_weight_decay ? WeightDecay::kDecoupled
                                                  : WeightDecay::kL2;

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = P[i];
    TORCH_CHECK(p.device() == device, "dlopt::adam_step (cuda): all tensors must be on one CUDA "
                "device, but params[", i, "] is on ", p.device(), " and params[0] on ", device);
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
    cuda::check_step_tensor(state_steps[i], device, i);
  }

  const c10::cuda::CUDAGuard guard(device);
  AdamHyper h;
  h.lr = cuda::scalar_ref(lr, device, "lr", 0.0);
  h.grad_scale = cuda::scalar_ref(grad_scale, device, "grad_scale", 1.0);
  h.found_inf = cuda::scalar_ref(found_inf, device, "found_inf", 0.0);
  h.seed = cuda::scalar_ref(sr_seed, device, "sr_seed", 0.0, /*integral=*/true);
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.weight_decay = weight_decay;
  h.eps = eps;
  h.maximize = maximize;

  // Phase 1. The scratch buffer comes from the caching allocator (graph-safe).
  at::Tensor coeff_buf = at::empty({static_cast<int64_t>(n * sizeof(AdamTensorCoeffs))},
                                   P[0].options().dtype(at::kByte));
  auto* coeffs = reinterpret_cast<AdamTensorCoeffs*>(coeff_buf.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::for_each_step_batch(state_steps, [&](const StepBatch& b) {
    adam_prepare_kernel<<<(b.count + 127) / 128, 128, 0, stream>>>(b, h, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Phase 2 over tensors laid out like their params (scratch copies otherwise).
  AlignedLists L({P, grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), max_exp_avg_sqs.vec(),
                  master_params.vec()},
                 {true, false, true, true, true, true});
  std::map<std::tuple<int, int>, Entries> groups;  // (param dtype, state dtype)
  for (size_t i = 0; i < n; ++i) {
    mta::TensorEntry<kNumLists, int32_t> e{};
    e.numel = L[0][i].numel();
    if (e.numel == 0) continue;
    for (int k = 0; k < kNumLists; ++k)
      e.ptr[k] = L[k].empty() ? nullptr : L[k][i].data_ptr();
    if (!amsgrad) e.ptr[kMaxExpAvgSq] = nullptr;  // may be given, but is not ours to touch
    e.meta = static_cast<int32_t>(i);
    groups[{static_cast<int>(L[0][i].scalar_type()), static_cast<int>(L[2][i].scalar_type())}]
        .push_back(e);
  }
  const AdamShared shared{h.found_inf, coeffs, wd};
  for (const auto& [key, entries] : groups) {
    const auto pt = static_cast<at::ScalarType>(std::get<0>(key));
    const auto st = static_cast<at::ScalarType>(std::get<1>(key));
    cuda::pick_storage<PickAdam>(pt, st, store, amsgrad)(entries, shared);
  }
  L.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }

}  // namespace dlopt
