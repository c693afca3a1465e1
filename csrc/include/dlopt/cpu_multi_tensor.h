// Scaffolding every multi-tensor CPU optimizer kernel shares: the storage-dtype
// dispatch, host-side scalar reads, step counting, and one parallel region over
// fixed-size chunks of all tensors in a call (so 1,000 tiny tensors cost one
// fork/join, not 1,000).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

#include "dlopt/cpu_storage.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {

constexpr int64_t kCpuChunk = 32768;

// body(tensor_index, begin, end) over kCpuChunk-element pieces of tensors with
// `numels` elements (zero-size tensors are skipped), all in one at::parallel_for.
// Threads get equal shares of the elements, not of the chunks: a chunk goes to the
// thread whose share holds its first element. (Shared by count, small tensors weighed
// as much as full chunks: of the 520 chunks of the benchmarks' CPU GPT-2 list,
// gpt2_small_shapes(1/3), 98 hold 1K elements or less, and the first of two threads got
// 18% more elements than the second.) A chunk's work does not depend on which thread
// runs it, so neither do the results.
template <class Body>
void for_each_chunk(const std::vector<int64_t>& numels, const Body& body) {
  struct Chunk {
    int32_t t;
    int64_t begin, end;
    int64_t offset;  // its first element's place among all chunks' elements
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t i = 0; i < numels.size(); ++i)
    for (int64_t b = 0; b < numels[i]; b += kCpuChunk) {
      const int64_t e = std::min(numels[i], b + kCpuChunk);
      chunks.push_back({static_cast<int32_t>(i), b, e, total});
      total += e - b;
    }
  at::parallel_for(0, total, kCpuChunk, [&](int64_t lo, int64_t hi) {
    auto k = std::lower_bound(chunks.begin(), chunks.end(), lo,
                              [](const Chunk& c, int64_t v) { return c.offset < v; });
    for (; k != chunks.end() && k->offset < hi; ++k) body(k->t, k->begin, k->end);
  });
}

inline double scalar_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1, "dlopt: ", name, " must have one element, got ", t.numel());
  return t.item<double>();
}

// GradScaler's found_inf: a non-zero value skips the whole step (steps included).
inline bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && scalar_value(*found_inf, "found_inf") != 0.0;
}

// (maximize ? -1 : 1) / grad_scale, applied to every grad element.
inline double grad_multiplier(bool maximize, const std::optional<at::Tensor>& grad_scale) {
  double mul = maximize ? -1.0 : 1.0;
  if (grad_scale.has_value()) mul /= scalar_value(*grad_scale, "grad_scale");
  return mul;
}

inline void check_step_tensor(const at::Tensor& s, size_t i) {
  TORCH_CHECK(s.numel() == 1 && s.device().is_cpu() &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "dlopt: state_steps[", i, "] must be a one-element float32/float64 CPU tensor");
}

// Adds one to a step tensor in place (no dispatcher call: 1,000 add_ calls would
// cost more than a small step) and returns the new count.
inline double increment_step(const at::Tensor& s) {
  if (s.scalar_type() == at::kFloat) {
    float* sp = s.data_ptr<float>();
    return static_cast<double>(*sp += 1.0f);
  }
  double* sp = s.data_ptr<double>();
  return *sp += 1.0;
}

// Maps (param dtype, state dtype, store mode) to the template instantiation
// `Pick<P, S, STORE>::get(args...)`. fp32 params honour a master copy and ignore
// stochastic rounding; bf16 params take any mode; fp16 params no stochastic rounding.
template <template <class, class, Store> class Pick, class... Args>
auto pick_storage(at::ScalarType pt, at::ScalarType st, Store store, Args... args) {
  const bool f32_state = st == at::kFloat;
  switch (pt) {
    case at::kFloat:
      return store == Store::kMaster ? Pick<F32, F32, Store::kMaster>::get(args...)
                                     : Pick<F32, F32, Store::kNearest>::get(args...);
    case at::kBFloat16:
      if (store == Store::kMaster) return Pick<BF16, F32, Store::kMaster>::get(args...);
      if (store == Store::kStochastic)
        return f32_state ? Pick<BF16, F32, Store::kStochastic>::get(args...)
                         : Pick<BF16, BF16, Store::kStochastic>::get(args...);
      return f32_state ? Pick<BF16, F32, Store::kNearest>::get(args...)
                       : Pick<BF16, BF16, Store::kNearest>::get(args...);
    case at::kHalf:
      TORCH_CHECK(store != Store::kStochastic,
                  "dlopt: stochastic rounding supports bfloat16 and float32 params, not float16");
      if (store == Store::kMaster) return Pick<F16, F32, Store::kMaster>::get(args...);
      return f32_state ? Pick<F16, F32, Store::kNearest>::get(args...)
                       : Pick<F16, F16, Store::kNearest>::get(args...);
    default:
      // float64 never reaches here: every CPU kernel takes float64 calls (float64_call
      // below: float64 params only, refused before this is called otherwise)
      TORCH_CHECK_TYPE(false, "dlopt: unsupported param dtype ", pt, kDtypeHint);
  }
}

// pick_storage for arithmetic of type C: for double (a float64 call: float64_call),
// float64 params and states, rounded to nearest.
template <template <class, class, Store> class Pick, class C, class... Args>
auto pick_storage_for(at::ScalarType pt, at::ScalarType st, Store store, Args... args) {
  if constexpr (std::is_same_v<C, double>) {
    return Pick<F64, F64, Store::kNearest>::get(args...);
  } else {
    return pick_storage<Pick>(pt, st, store, args...);
  }
}

// Whether a call steps float64 params, in double arithmetic (the kernels of the ops
// that take them). A float64 call holds only float64 params, each with float64 states
// and no master copy; mixing float64 with other params in one call is refused (the
// optimizers call once per dtype).
inline bool float64_call(at::TensorList params, std::initializer_list<at::TensorList> states,
                         bool use_master) {
  const bool wide = !params.empty() && params[0].scalar_type() == at::kDouble;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE((params[i].scalar_type() == at::kDouble) == wide, "dlopt: params[", i,
                     "] is ", params[i].scalar_type(), " but params[0] is ",
                     params[0].scalar_type(), ": float64 params come in a call of their own");
    if (!wide) continue;
    for (const at::TensorList& list : states)
      TORCH_CHECK_TYPE(list.empty() || list[i].scalar_type() == at::kDouble,
                       "dlopt: the states of float64 params[", i, "] must be float64, got ",
                       list[i].scalar_type());
  }
  TORCH_CHECK_TYPE(!wide || !use_master,
                   "dlopt: master weights are for bfloat16, float16 and float32 params, not "
                   "float64 ones");
  return wide;
}

}  // namespace dlopt
