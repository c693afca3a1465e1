// Host-side helpers shared by the CPU and CUDA wrappers of multi-tensor ops; defined in
// csrc/common/tensor_lists.cpp, which only g++ compiles (a TORCH_CHECK whose message
// formats a number crashed when nvcc compiled it: docs/compat.md). Lists are taken as
// at::TensorList views: copying a 1,000-tensor std::vector costs two atomic refcount
// operations per tensor.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace dlopt {

// The end of the "unsupported param dtype" error of the compiled optimizer kernels.
inline constexpr const char* kDtypeHint =
    " (the compiled kernels take float32, bfloat16 and float16 params; float64 params run "
    "on backend='auto' or 'reference', in a call of their own)";

// Kernels walk a param and all its per-param tensors (grad, states) with one
// flat index, which is only right when they share one dense memory layout.
// torch's own fused CPU AdamW skips this and silently mis-updates a param whose
// grad is transposed; we instead give every tensor that does not line up a
// scratch copy with the param's layout and copy mutated ones back afterwards.
// The caller's lists are kept as views (they must outlive this object) and only the
// scratch copies are stored, so the usual call, where everything lines up, copies
// no tensor handle.
class AlignedLists {
 public:
  // One list of the call as the kernel should see it: L[k][i].
  class List {
   public:
    const at::Tensor& operator[](size_t i) const {
      return slot_->empty() || (*slot_)[i] < 0 ? list_[i] : (*copies_)[(*slot_)[i]];
    }
    size_t size() const { return list_.size(); }
    bool empty() const { return list_.empty(); }

   private:
    friend class AlignedLists;
    List(at::TensorList list, const std::vector<int32_t>* slot,
         const std::vector<at::Tensor>* copies)
        : list_(list), slot_(slot), copies_(copies) {}
    at::TensorList list_;
    const std::vector<int32_t>* slot_;
    const std::vector<at::Tensor>* copies_;
  };

  // lists[0] are the params; mutated[k] says whether list k is written. An empty list
  // stands for an absent one (no master weights, no amsgrad state, ...).
  AlignedLists(std::initializer_list<at::TensorList> lists, std::initializer_list<bool> mutated);
  List operator[](size_t k) const { return List(lists_[k], &slot_[k], &copies_); }
  // Copies scratch tensors back into the caller's tensors.
  void finish();

 private:
  std::vector<at::TensorList> lists_;
  std::vector<std::vector<int32_t>> slot_;  // per list: empty, or per tensor -1 / index in copies_
  std::vector<at::Tensor> copies_;
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback_;  // (caller's, scratch)
};

// Row-major (contiguous) stand-ins for tensors a kernel indexes by logical position
// (Adafactor's row and column factors need the last two dims as rows and columns): a
// contiguous tensor is used as is, any other gets a contiguous copy, kept alive by this
// object, which finish() copies back into the caller's tensor if it is written.
class ContiguousCopies {
 public:
  at::Tensor get(const at::Tensor& t, bool mutated);
  void finish();

 private:
  struct Copy {
    at::Tensor orig, copy;
    bool mutated;
  };
  std::vector<Copy> copies_;
};

// Ops called from Python through the dispatcher do not bump the version counters
// of the tensors they mutate (autograd's in-place checks rely on them): do it here.
inline void bump_versions(at::TensorList ts) {
  for (const auto& t : ts) t.unsafeGetTensorImpl()->bump_version();
}

// `other` has as many tensors as `ref` (or none, if may_be_empty).
void check_same_length(at::TensorList ref, at::TensorList other, const char* name,
                       bool may_be_empty);

// t has p's shape and device.
void check_like_param(const at::Tensor& p, const at::Tensor& t, const char* name, size_t i);

// The list checks of an element-wise optimizer op (every per-param tensor shaped like
// its param): one length for every list (`master_params` may be empty); grads of the
// param's dtype; the state lists (name, list) of one dtype per param, float32 or the
// param dtype; float32 masters with float32 states; no stochastic rounding for fp16
// params. Devices and step tensors are the caller's (they differ by backend).
struct NamedList {
  const char* name;
  at::TensorList list;
};

void check_elementwise_lists(at::TensorList params, at::TensorList grads,
                             c10::ArrayRef<NamedList> states,  // {{"name", list}, ...}
                             at::TensorList master_params, at::TensorList state_steps,
                             bool use_sr, bool has_steps = true);

// The list checks of Adafactor's op (torch's state layout): params, grads, masters and
// steps as check_elementwise_lists; row_vars and col_vars hold one tensor per param of 2
// or more dims (the param's shape with dim -1, resp. -2, set to 1) and variances one per
// 0-/1-D param (the param's shape), each in param order; a param's states share one
// dtype, float32 or the param dtype (float32 under master weights).
void check_factored_lists(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                          at::TensorList col_vars, at::TensorList variances,
                          at::TensorList master_params, at::TensorList state_steps, bool use_sr);

}  // namespace dlopt
