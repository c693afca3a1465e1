// dlopt_C::multi_tensor_norm on CUDA; same semantics as csrc/cpu/multi_tensor_norm.cpp.
//
// Three steps on the current stream, none of which waits for the host (so a caller
// can capture it in a CUDA graph):
//   1. multi_tensor_reduce with NormOp, one launch series per input dtype: each
//      block reduces one 64K-element chunk (fp32 terms, fp32 per thread, double
//      across the block) to a double partial.
//   2. segment_reduce: one block per tensor combines its chunks' partials into the
//      tensor's raw value and norm.
//   3. norm_total_kernel, one block: the total from the raw values.
// The maths is dlopt/norm_math.h; the order of every reduction is fixed.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <vector>

#include "dlopt/cuda_storage.cuh"
#include "dlopt/multi_tensor_apply.cuh"
#include "dlopt/multi_tensor_reduce.cuh"
#include "dlopt/norm_math.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

// float64 inputs are read and reduced in fp32 like the others.
struct F64 {
  using T = double;
  DLOPT_HD static float load(double x) { return static_cast<float>(x); }
};

struct NormMeta {
  int64_t chunk_base;
};

struct NormReduce {
  NormKind kind;
  DLOPT_HD float identity(int) const { return norm_identity<float>(kind); }
  DLOPT_HD double combine(double a, double b, int) const { return norm_combine(kind, a, b); }
};

template <class S>
struct NormOp : NormReduce {
  static constexpr int kLists = 1;
  static constexpr int kPartials = 1;
  template <int K>
  using List = mta::Access<S, mta::kRead>;
  using Meta = NormMeta;
  struct Block {};
  double* partials;
  float p;

  DLOPT_HD bool begin(const Meta&, Block&) const { return true; }
  DLOPT_HD void operator()(float (&x)[kLists], const Block&, int64_t,
                           float (&acc)[kPartials]) const {
    acc[0] = norm_combine(kind, acc[0], norm_term<float>(kind, x[0], p));
  }
};

struct NormFinish : NormReduce {
  static constexpr int kPartials = 1;
  double* raw;
  float* norms;
  double ord;
  DLOPT_HD void finish(int64_t i, const double (&v)[kPartials]) const {
    raw[i] = v[0];
    norms[i] = static_cast<float>(norm_finish(kind, v[0], ord));
  }
};

constexpr int kTotalBlock = 512;

__global__ void __launch_bounds__(kTotalBlock)
    norm_total_kernel(const double* raw, int64_t n, float* total, NormReduce red, double ord) {
  double v[1] = {norm_identity<double>(red.kind)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v[0] = norm_total_add(red.kind, v[0], raw[i]);
  mta::block_reduce<1>(v, red);  // partial counts (kL0) add up like sums
  if (threadIdx.x == 0) *total = static_cast<float>(norm_total_finish(red.kind, v[0], ord));
}

using Entries = std::vector<mta::TensorEntry<1, NormMeta>>;

template <class S>
void launch(const Entries& entries, NormKind kind, double* partials, double ord) {
  NormOp<S> op;
  op.kind = kind;
  op.partials = partials;
  op.p = static_cast<float>(ord);
  mta::multi_tensor_reduce(entries, op);
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cuda(at::TensorList tensors,
                                                          double norm_type) {
  const size_t n = tensors.size();
  TORCH_CHECK(n > 0, "dlopt::multi_tensor_norm (cuda): no tensors");
  const c10::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::multi_tensor_norm (cuda): tensors[0] is on ", device);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].device() == device, "dlopt::multi_tensor_norm (cuda): all tensors "
                "must be on one device, but tensors[", i, "] is on ", tensors[i].device(),
                " and tensors[0] on ", device);
    const auto dt = tensors[i].scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
                "dlopt::multi_tensor_norm: tensors[", i, "] has dtype ", dt,
                "; float32, bfloat16, float16 or float64 only");
  }
  const c10::cuda::CUDAGuard guard(device);
  const NormKind kind = norm_kind(norm_type);
  AlignedLists L({std::vector<at::Tensor>(tensors.begin(), tensors.end())}, {false});

  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) numels[i] = L[0][i].numel();
  const std::vector<int64_t> bases = mta::chunk_bases(numels);
  const auto f64 = tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(bases[n], 1)}, f64);
  at::Tensor raw = at::empty({static_cast<int64_t>(n)}, f64);
  at::Tensor norms = at::empty({static_cast<int64_t>(n)}, f64.dtype(at::kFloat));
  at::Tensor total = at::empty({}, f64.dtype(at::kFloat));

  std::map<int, Entries> groups;  // by dtype
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] == 0) continue;
    mta::TensorEntry<1, NormMeta> e{};
    e.ptr[0] = const_cast<void*>(L[0][i].const_data_ptr());
    e.numel = numels[i];
    e.meta.chunk_base = bases[i];
    groups[static_cast<int>(L[0][i].scalar_type())].push_back(e);
  }
  double* part = partials.data_ptr<double>();
  for (const auto& [dt, entries] : groups) {
    switch (static_cast<at::ScalarType>(dt)) {
      case at::kFloat: launch<cuda::F32>(entries, kind, part, norm_type); break;
      case at::kBFloat16: launch<cuda::BF16>(entries, kind, part, norm_type); break;
      case at::kHalf: launch<cuda::F16>(entries, kind, part, norm_type); break;
      default: launch<F64>(entries, kind, part, norm_type); break;
    }
  }
  NormFinish fin;
  fin.kind = kind;
  fin.raw = raw.data_ptr<double>();
  fin.norms = norms.data_ptr<float>();
  fin.ord = norm_type;
  mta::segment_reduce(bases, part, fin);
  norm_total_kernel<<<1, kTotalBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      fin.raw, static_cast<int64_t>(n), total.data_ptr<float>(), NormReduce{kind}, norm_type);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norms, total};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlopt_C, CUDA, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cuda); }

}  // namespace dlopt
