// dlopt_C::multi_tensor_scale_ on the CPU: tensors[i] *= scale for a whole list in one
// parallel region. clip_grad_norm_ scales the grads with it on the CPU, where torch's
// _foreach_mul_ runs one kernel (one fork/join) per tensor. Each element becomes
// x * scale computed in fp32 and rounded to the tensor's dtype to nearest-even, as
// torch's mul_ by a 0-dim tensor computes it for fp32, bf16 and fp16: the same bits.
// Like the norm, each chunk is walked as two streams (its halves).
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

using ChunkFn = void (*)(void*, int64_t, int64_t, float);

template <class S>
void scale_chunk(void* data, int64_t begin, int64_t end, float s) {
  auto* __restrict__ x = static_cast<typename S::T*>(data);
  constexpr int64_t kStep = 64;
  const int64_t half = (end - begin) / (2 * kStep) * kStep;
  for (int64_t o = 0; o < half; o += kStep) {
    auto* __restrict__ a = x + begin + o;
    auto* __restrict__ b = x + begin + half + o;
    prefetch_block<kStep>(a, 0);
    prefetch_block<kStep>(b, 0);
#pragma omp simd
    for (int64_t j = 0; j < kStep; ++j) a[j] = S::store(S::load(a[j]) * s);
#pragma omp simd
    for (int64_t j = 0; j < kStep; ++j) b[j] = S::store(S::load(b[j]) * s);
  }
  for (int64_t i = begin + 2 * half; i < end; ++i) x[i] = S::store(S::load(x[i]) * s);
}

ChunkFn pick_scale(at::ScalarType dt, size_t i) {
  switch (dt) {
    case at::kFloat: return &scale_chunk<F32>;
    case at::kBFloat16: return &scale_chunk<BF16>;
    case at::kHalf: return &scale_chunk<F16>;
    default:
      TORCH_CHECK(false, "dlopt::multi_tensor_scale_: tensors[", i, "] has dtype ", dt,
                  "; float32, bfloat16 or float16 only");
  }
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& scale) {
  const size_t n = tensors.size();
  const float s = static_cast<float>(scalar_value(scale, "scale"));
  std::vector<ChunkFn> fns(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "dlopt::multi_tensor_scale_ (cpu): tensors[", i,
                "] is on ", tensors[i].device());
    fns[i] = pick_scale(tensors[i].scalar_type(), i);
  }
  // Only dense tensors are walked as flat memory; others get a copy, written back.
  AlignedLists L({tensors}, {true});
  std::vector<int64_t> numels(n);
  std::vector<void*> data(n);
  for (size_t i = 0; i < n; ++i) {
    numels[i] = L[0][i].numel();
    data[i] = numels[i] ? L[0][i].data_ptr() : nullptr;
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](data[t], b, e, s); });
  L.finish();
  bump_versions(tensors);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("multi_tensor_scale_", &multi_tensor_scale_cpu); }

}  // namespace dlopt
