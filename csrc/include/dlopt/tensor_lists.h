// Host-side helpers shared by the CPU and CUDA wrappers of multi-tensor ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <string>
#include <vector>

namespace dlopt {

// Kernels walk a param and all its per-param tensors (grad, states) with one
// flat index, which is only right when they share one dense memory layout.
// torch's own fused CPU AdamW skips this and silently mis-updates a param whose
// grad is transposed; we instead give every tensor that does not line up a
// scratch copy with the param's layout and copy mutated ones back afterwards.
class AlignedLists {
 public:
  // lists[0] are the params; mutated[k] says whether list k is written.
  AlignedLists(std::vector<std::vector<at::Tensor>> lists, const std::vector<bool>& mutated)
      : lists_(std::move(lists)) {
    const auto& params = lists_[0];
    for (size_t i = 0; i < params.size(); ++i) {
      at::Tensor p = params[i];
      if (!p.is_non_overlapping_and_dense()) {
        at::Tensor pw = p.contiguous();
        if (mutated[0]) writeback_.emplace_back(p, pw);
        lists_[0][i] = pw;
        p = pw;
      }
      for (size_t k = 1; k < lists_.size(); ++k) {
        if (lists_[k].empty()) continue;
        const at::Tensor& t = lists_[k][i];
        if (t.strides() == p.strides() && t.is_non_overlapping_and_dense()) continue;
        at::Tensor tw = at::empty_like(p, t.options());
        tw.copy_(t);
        if (mutated[k]) writeback_.emplace_back(t, tw);
        lists_[k][i] = tw;
      }
    }
  }
  const std::vector<at::Tensor>& operator[](size_t k) const { return lists_[k]; }
  // Copies scratch tensors back into the caller's tensors.
  void finish() {
    for (auto& pr : writeback_) pr.first.copy_(pr.second);
    writeback_.clear();
  }

 private:
  std::vector<std::vector<at::Tensor>> lists_;
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback_;
};

// Ops called from Python through the dispatcher do not bump the version counters
// of the tensors they mutate (autograd's in-place checks rely on them): do it here.
inline void bump_versions(c10::ArrayRef<at::Tensor> ts) {
  for (const auto& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

inline void check_same_length(const std::vector<at::Tensor>& ref, const std::vector<at::Tensor>& other,
                              const char* name, bool may_be_empty) {
  TORCH_CHECK((may_be_empty && other.empty()) || other.size() == ref.size(), "dlopt: ", name,
              " has ", other.size(), " tensors but params has ", ref.size());
}

inline void check_like_param(const at::Tensor& p, const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), "dlopt: ", name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(t.device() == p.device(), "dlopt: ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device());
}

}  // namespace dlopt
