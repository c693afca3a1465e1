// Multi-tensor LAMB step on CUDA; same semantics as csrc/cpu/optim_lamb.cpp, maths in
// dlopt/lamb_math.h. Four phases on the current stream, none of which waits for the
// host (the step can be captured in a CUDA graph):
//   1. lamb_prepare_kernel, one thread per tensor: unless found_inf is set, steps
//      += 1 in device memory (dlopt/cuda_steps.cuh) and the tensor's coefficients
//      (bias corrections, 1 / grad_scale times the global-norm clip factor, SR key).
//   2. multi_tensor_reduce with LambMomentsOp (dlopt/multi_tensor_reduce.cuh): m, v
//      updated; each block writes the sums of p^2 and u^2 of its chunk.
//   3. segment_reduce with LambTrust: per tensor, the trust ratio from its chunks'
//      sums, stored as the tensor's step scale lr * trust.
//   4. multi_tensor_apply with LambApplyOp: p -= scale * u, u recomputed from the
//      stored m, v (the same u whose norm was taken).
// lr, grad_scale, global_grad_norm, found_inf and sr_seed may live on the params' GPU
// (read by the kernels) or on the CPU (read here on the host, which needs no sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/lamb_math.h"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/multi_tensor_reduce.cuh"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

// Per-tensor values: phase 1 writes all but `scale`, phase 3 writes `scale`.
struct LambTensorCoeffs {
  AdamCoeffs c;
  float grad_mul;  // 1 / grad_scale * clip factor
  float scale;     // lr * trust ratio
  uint32_t sr_key;
};

struct LambHyper {
  ScalarRef lr, grad_scale, global_grad_norm, found_inf, seed;
  double beta1, beta2, weight_decay, eps, max_grad_norm;
  bool bias_correction;
};
static_assert(sizeof(cuda::StepBatch) + sizeof(LambHyper) + sizeof(void*) <= 4096,
              "lamb_prepare_kernel arguments over 4 KB");

// ---- phase 1 -------------------------------------------------------------------------

DLOPT_HD void lamb_prepare_one(const cuda::StepBatch& b, const LambHyper& h,
                               LambTensorCoeffs* out, int k) {
  if (k >= b.count || cuda::skip_step(h.found_inf)) return;
  const double step = cuda::bump_step(b, k);
  LambTensorCoeffs r;
  r.c = lamb_coeffs(step, h.beta1, h.beta2, h.weight_decay, h.eps, h.bias_correction);
  const double unscale = 1.0 / cuda::load_f64(h.grad_scale);
  const double clip = h.max_grad_norm > 0.0
      ? lamb_clip_factor(cuda::load_f64(h.global_grad_norm) * unscale, h.max_grad_norm)
      : 1.0;
  r.grad_mul = static_cast<float>(unscale * clip);
  r.scale = 0.f;
  const int32_t i = b.first + k;
  r.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(h.seed)), static_cast<uint32_t>(i));
  out[i] = r;
}

__global__ void lamb_prepare_kernel(const __grid_constant__ cuda::StepBatch b,
                                    const __grid_constant__ LambHyper h, LambTensorCoeffs* out) {
  lamb_prepare_one(b, h, out, blockIdx.x * blockDim.x + threadIdx.x);
}

// ---- phases 2 and 4 --------------------------------------------------------------------

enum : int { kParam, kGrad, kExpAvg, kExpAvgSq, kMaster, kNumLists };

struct LambMeta {
  int64_t chunk_base;  // first chunk of this tensor in the partials (phase 2)
  int32_t index;       // global tensor index
};

struct LambShared {
  ScalarRef found_inf;
  const LambTensorCoeffs* coeffs;
  bool wd;  // weight_decay != 0: a uniform runtime branch keeps the kernel count down

  DLOPT_HD bool load(const LambMeta& meta, LambTensorCoeffs& b) const {
    if (cuda::skip_step(found_inf)) return false;
    b = coeffs[meta.index];
    return true;
  }
  DLOPT_HD float direction(float p, float m, float v, const AdamCoeffs& c) const {
    return wd ? lamb_direction<true>(p, m, v, c) : lamb_direction<false>(p, m, v, c);
  }
};

// PS: param storage, S: state storage.
template <class PS, class S, bool MASTER>
struct LambMomentsOp : LambShared {
  static constexpr int kLists = kNumLists;
  static constexpr int kPartials = 2;  // sum p^2, sum u^2
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<std::conditional_t<MASTER, mta::NoAccess, mta::Access<PS, mta::kRead>>,
                    mta::Access<PS, mta::kRead>,       // grad
                    mta::Access<S, mta::kReadWrite>,   // exp_avg
                    mta::Access<S, mta::kReadWrite>,   // exp_avg_sq
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kRead>,
                                       mta::NoAccess>>>;
  using Meta = LambMeta;
  using Block = LambTensorCoeffs;
  double* partials;

  DLOPT_HD bool begin(const Meta& meta, Block& b) const { return load(meta, b); }
  DLOPT_HD float identity(int) const { return 0.f; }
  DLOPT_HD double combine(double a, double b, int) const { return a + b; }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t i,
                           float (&acc)[kPartials]) const {
    const float p = MASTER ? x[kMaster] : x[kParam];
    adam_moments(x[kGrad] * b.grad_mul, x[kExpAvg], x[kExpAvgSq], b.c);
    // u from the moments as they will be stored (rounded if low precision)
    const float m = S::load(S::store(x[kExpAvg], b, i));
    const float v = S::load(S::store(x[kExpAvgSq], b, i));
    const float u = direction(p, m, v, b.c);
    acc[0] += p * p;
    acc[1] += u * u;
  }
};

template <class PS, class S, bool MASTER>
struct LambApplyOp : LambShared {
  static constexpr int kLists = kNumLists;
  template <int K>
  using List = std::tuple_element_t<
      K, std::tuple<mta::Access<PS, MASTER ? mta::kWrite : mta::kReadWrite>,  // param
                    mta::NoAccess,                                              // grad
                    mta::Access<S, mta::kRead>,                                 // exp_avg
                    mta::Access<S, mta::kRead>,                                 // exp_avg_sq
                    std::conditional_t<MASTER, mta::Access<cuda::F32, mta::kReadWrite>,
                                       mta::NoAccess>>>;
  using Meta = LambMeta;
  using Block = LambTensorCoeffs;

  DLOPT_HD bool begin(const Meta& meta, Block& b) const { return load(meta, b); }

  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t) const {
    // With master weights the update runs on the fp32 master; the param only receives it.
    float& p = MASTER ? x[kMaster] : x[kParam];
    p = p - b.scale * direction(p, x[kExpAvg], x[kExpAvgSq], b.c);
    if (MASTER) x[kParam] = x[kMaster];
  }
};

// ---- phase 3 ---------------------------------------------------------------------------

struct LambTrust {
  static constexpr int kPartials = 2;
  LambTensorCoeffs* coeffs;
  ScalarRef lr, found_inf;
  DLOPT_HD float identity(int) const { return 0.f; }
  DLOPT_HD double combine(double a, double b, int) const { return a + b; }
  DLOPT_HD void finish(int64_t i, const double (&v)[kPartials]) const {
    if (cuda::skip_step(found_inf)) return;
    coeffs[i].scale =
        static_cast<float>(cuda::load_f64(lr) * lamb_trust_ratio(sqrt(v[0]), sqrt(v[1])));
  }
};

// ---- host --------------------------------------------------------------------------------

using Entries = std::vector<mta::TensorEntry<kNumLists, LambMeta>>;

struct LambLaunch {
  void (*moments)(const Entries&, const LambShared&, double*);
  void (*apply)(const Entries&, const LambShared&);
};

template <class PS, class S, bool MASTER>
struct PickLamb {
  static void moments(const Entries& entries, const LambShared& shared, double* partials) {
    LambMomentsOp<PS, S, MASTER> op;
    static_cast<LambShared&>(op) = shared;
    op.partials = partials;
    mta::multi_tensor_reduce(entries, op);
  }
  static void apply(const Entries& entries, const LambShared& shared) {
    LambApplyOp<PS, S, MASTER> op;
    static_cast<LambShared&>(op) = shared;
    mta::multi_tensor_apply(entries, op);
  }
  static LambLaunch get() { return {&moments, &apply}; }
};

void lamb_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList master_params,
                    at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                    double weight_decay, double eps, bool bias_correction, double max_grad_norm,
                    const std::optional<at::Tensor>& global_grad_norm,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  std::vector<at::Tensor> P(params.begin(), params.end());
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_elementwise_lists(P, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                          master_params, state_steps, use_sr);
  TORCH_CHECK(max_grad_norm <= 0.0 || global_grad_norm.has_value(),
              "dlopt::lamb_step: max_grad_norm > 0 needs global_grad_norm");
  if (n == 0) return;
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "dlopt: too many tensors");
  const c10::Device device = P[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::lamb_step (cuda): params[0] is on ", device);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device() == device, "dlopt::lamb_step (cuda): all tensors must be on one "
                "CUDA device, but params[", i, "] is on ", P[i].device(), " and params[0] on ",
                device);
    cuda::check_step_tensor(state_steps[i], device, i);
  }
  const cuda::StoreMode store = use_master ? cuda::StoreMode::kMaster
                                : use_sr   ? cuda::StoreMode::kStochastic
                                           : cuda::StoreMode::kNearest;

  const c10::cuda::CUDAGuard guard(device);
  LambHyper h;
  h.lr = cuda::scalar_ref(lr, device, "lr", 0.0);
  h.grad_scale = cuda::scalar_ref(grad_scale, device, "grad_scale", 1.0);
  h.global_grad_norm = cuda::scalar_ref(global_grad_norm, device, "global_grad_norm", 0.0);
  h.found_inf = cuda::scalar_ref(found_inf, device, "found_inf", 0.0);
  h.seed = cuda::scalar_ref(sr_seed, device, "sr_seed", 0.0, /*integral=*/true);
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.weight_decay = weight_decay;
  h.eps = eps;
  h.max_grad_norm = max_grad_norm;
  h.bias_correction = bias_correction;

  // Phase 1. Scratch buffers come from the caching allocator (graph-safe).
  at::Tensor coeff_buf = at::empty({static_cast<int64_t>(n * sizeof(LambTensorCoeffs))},
                                   P[0].options().dtype(at::kByte));
  auto* coeffs = reinterpret_cast<LambTensorCoeffs*>(coeff_buf.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::for_each_step_batch(state_steps, [&](const cuda::StepBatch& b) {
    lamb_prepare_kernel<<<(b.count + 127) / 128, 128, 0, stream>>>(b, h, coeffs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Phases 2-4 over tensors laid out like their params (scratch copies otherwise).
  AlignedLists L({P, grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), master_params.vec()},
                 {true, false, true, true, true});
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) numels[i] = L[0][i].numel();
  const std::vector<int64_t> bases = mta::chunk_bases(numels);
  at::Tensor partials = at::empty({2 * std::max<int64_t>(bases[n], 1)},
                                  P[0].options().dtype(at::kDouble));
  std::map<std::tuple<int, int>, Entries> groups;  // (param dtype, state dtype)
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    mta::TensorEntry<kNumLists, LambMeta> e{};
    e.numel = numels[i];
    for (int k = 0; k < kNumLists; ++k) e.ptr[k] = L[k].empty() ? nullptr : L[k][i].data_ptr();
    e.meta.chunk_base = bases[i];
    e.meta.index = static_cast<int32_t>(i);
    groups[{static_cast<int>(L[0][i].scalar_type()), static_cast<int>(L[2][i].scalar_type())}]
        .push_back(e);
  }
  const LambShared shared{h.found_inf, coeffs, weight_decay != 0.0};
  std::vector<std::pair<LambLaunch, const Entries*>> launches;
  for (const auto& [key, entries] : groups) {
    const auto pt = static_cast<at::ScalarType>(std::get<0>(key));
    const auto st = static_cast<at::ScalarType>(std::get<1>(key));
    launches.emplace_back(cuda::pick_storage<PickLamb>(pt, st, store), &entries);
  }
  for (const auto& [launch, entries] : launches)
    launch.moments(*entries, shared, partials.data_ptr<double>());
  LambTrust trust;
  trust.coeffs = coeffs;
  trust.lr = h.lr;
  trust.found_inf = h.found_inf;
  mta::segment_reduce(bases, partials.data_ptr<double>(), trust);
  for (const auto& [launch, entries] : launches) launch.apply(*entries, shared);
  L.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("lamb_step", &lamb_step_cuda); }

}  // namespace dlopt
