// Multi-tensor Adam / AdamW step on CUDA, kernels and launcher (nvcc); the checks and
// the registered op are in optim_adam_host.cpp (g++), semantics as csrc/cpu/optim_adam.cpp.
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
// the kernels) or on the CPU (read by the host half, which needs no sync).
#include <tuple>
#include <type_traits>

#include "dlopt/adam_math.h"
#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/rounding.h"

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

// tests/cuda_emulation/mta_emulation.cu counts the launches of Adam-sized tables with this
static_assert(sizeof(AdamOp<cuda::F32, cuda::F32, false, false>) == 48, "AdamOp's size changed");

using Entries = std::vector<mta::TensorEntry<kNumLists, int32_t>>;

// The same choice as the CPU kernel's (cuda::pick_storage, dlopt/cuda_storage.cuh).
template <class PS, class S, bool MASTER>
struct PickAdam {
  static cudaError_t run(bool amsgrad, const AdamShared& shared, const Entries& entries,
                         cudaStream_t stream) {
    return amsgrad ? mta::multi_tensor_apply(entries, AdamOp<PS, S, MASTER, true>{shared}, stream)
                   : mta::multi_tensor_apply(entries, AdamOp<PS, S, MASTER, false>{shared}, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_adam_step(const Launch& l, double beta1, double beta2, double weight_decay,
                             double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay) {
  const AdamHyper h{l.lr, l.grad_scale, l.found_inf, l.seed, beta1, beta2, weight_decay, eps,
                    maximize};
  const WeightDecay wd = weight_decay == 0.0 ? WeightDecay::kNone
                         : decoupled_weight_decay ? WeightDecay::kDecoupled
                                                  : WeightDecay::kL2;

  // Phase 1.
  auto* coeffs = static_cast<AdamTensorCoeffs*>(l.scratch.get(l.n * sizeof(AdamTensorCoeffs)));
  if (coeffs == nullptr) return cudaErrorMemoryAllocation;
  DLOPT_CUDA_TRY(for_each_step_batch(l, [&](const StepBatch& b) {
#ifdef DLOPT_EMULATE  // a host-only build (multi_tensor_apply.cuh emulate_blocks)
    for (int k = 0; k < b.count; ++k) adam_prepare_one(b, h, coeffs, k);
    return cudaSuccess;
#else
    adam_prepare_kernel<<<(b.count + 127) / 128, 128, 0, l.stream>>>(b, h, coeffs);
    return cudaGetLastError();
#endif
  }));

  // Phase 2.
  const AdamShared shared{h.found_inf, coeffs, wd};
  return mta::apply_by_dtype<PickAdam, kNumLists, int32_t>(l, mta::tensor_index, amsgrad, shared);
}

}  // namespace cuda
}  // namespace dlopt
