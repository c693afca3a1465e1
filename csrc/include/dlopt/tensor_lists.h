// Host-side helpers shared by the CPU and CUDA wrappers of multi-tensor ops.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <initializer_list>
#include <optional>
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

// Row-major (contiguous) stand-ins for tensors a kernel indexes by logical position
// (Adafactor's row and column factors need the last two dims as rows and columns): a
// contiguous tensor is used as is, any other gets a contiguous copy, which finish()
// copies back into the caller's tensor if it is written.
class ContiguousCopies {
 public:
  at::Tensor get(const at::Tensor& t, bool mutated) {
    if (!t.defined() || t.is_contiguous()) return t;
    at::Tensor c = t.contiguous();
    if (mutated) writeback_.emplace_back(t, c);
    return c;
  }
  void finish() {
    for (auto& pr : writeback_) pr.first.copy_(pr.second);
    writeback_.clear();
  }

 private:
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

// The list checks of an element-wise optimizer op (every per-param tensor shaped like
// its param): one length for every list (`master_params` may be empty); grads of the
// param's dtype; the state lists (name, list) of one dtype per param, float32 or the
// param dtype; float32 masters with float32 states; no stochastic rounding for fp16
// params. Devices and step tensors are the caller's (they differ by backend).
struct NamedList {
  const char* name;
  at::TensorList list;
};

inline void check_elementwise_lists(const std::vector<at::Tensor>& P, at::TensorList grads,
                                    c10::ArrayRef<NamedList> states,  // {{"name", list}, ...}
                                    at::TensorList master_params, at::TensorList state_steps,
                                    bool use_sr, bool has_steps = true) {
  check_same_length(P, grads.vec(), "grads", false);
  for (const auto& s : states) check_same_length(P, s.list.vec(), s.name, false);
  check_same_length(P, master_params.vec(), "master_params", true);
  check_same_length(P, state_steps.vec(), "state_steps", !has_steps);  // SGD keeps none
  const bool use_master = !master_params.empty();
  for (size_t i = 0; i < P.size(); ++i) {
    const at::Tensor& p = P[i];
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "dlopt: grads[", i, "] dtype ",
                grads[i].scalar_type(), " != params dtype ", p.scalar_type());
    check_like_param(p, grads[i], "grads", i);
    std::optional<at::ScalarType> st;
    for (const auto& s : states) {
      const at::Tensor& t = s.list[i];
      check_like_param(p, t, s.name, i);
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == p.scalar_type(), "dlopt: ",
                  s.name, "[", i, "] dtype ", t.scalar_type(), " must be float32 or the param dtype");
      TORCH_CHECK(!st || *st == t.scalar_type(), "dlopt: state tensors of params[", i,
                  "] must share one dtype");
      st = t.scalar_type();
      TORCH_CHECK(!use_master || t.scalar_type() == at::kFloat,
                  "dlopt: master weights need float32 states");
    }
    if (use_master) {
      check_like_param(p, master_params[i], "master_params", i);
      TORCH_CHECK(master_params[i].scalar_type() == at::kFloat, "dlopt: master_params must be float32");
    }
    TORCH_CHECK(!use_sr || p.scalar_type() != at::kHalf,
                "dlopt: stochastic rounding supports bfloat16 and float32 params, not float16");
  }
}

// The list checks of Adafactor's op (torch's state layout): params, grads, masters and
// steps as check_elementwise_lists; row_vars and col_vars hold one tensor per param of 2
// or more dims (the param's shape with dim -1, resp. -2, set to 1) and variances one per
// 0-/1-D param (the param's shape), each in param order; a param's states share one
// dtype, float32 or the param dtype (float32 under master weights).
inline void check_factored_lists(const std::vector<at::Tensor>& P, at::TensorList grads,
                                 at::TensorList row_vars, at::TensorList col_vars,
                                 at::TensorList variances, at::TensorList master_params,
                                 at::TensorList state_steps, bool use_sr) {
  check_elementwise_lists(P, grads, {}, master_params, state_steps, use_sr);
  const bool use_master = !master_params.empty();
  auto check_dtype = [&](const at::Tensor& p, const at::Tensor& s, const char* name, size_t k) {
    const auto st = s.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == p.scalar_type(), "dlopt: ", name, "[", k, "] dtype ",
                st, " must be float32 or the param dtype");
    TORCH_CHECK(!use_master || st == at::kFloat, "dlopt: master weights need float32 states");
  };
  auto check_factor = [&](const at::Tensor& p, const at::Tensor& f, const char* name, size_t k,
                          int64_t dim) {
    std::vector<int64_t> want(p.sizes().begin(), p.sizes().end());
    want[want.size() + dim] = 1;
    TORCH_CHECK(f.sizes() == at::IntArrayRef(want), "dlopt: ", name, "[", k, "] has shape ",
                f.sizes(), " but its param of shape ", p.sizes(), " needs ",
                at::IntArrayRef(want));
    TORCH_CHECK(f.device() == p.device(), "dlopt: ", name, "[", k, "] is on ", f.device(),
                " but its param is on ", p.device());
    check_dtype(p, f, name, k);
  };
  size_t nf = 0, nv = 0;
  for (const at::Tensor& p : P) {
    if (p.dim() >= 2) {
      TORCH_CHECK(nf < row_vars.size() && nf < col_vars.size(), "dlopt: row_vars / col_vars "
                  "need one tensor per param of 2 or more dims, got ", row_vars.size(), " / ",
                  col_vars.size());
      check_factor(p, row_vars[nf], "row_vars", nf, -1);
      check_factor(p, col_vars[nf], "col_vars", nf, -2);
      TORCH_CHECK(col_vars[nf].scalar_type() == row_vars[nf].scalar_type(), "dlopt: row_vars[",
                  nf, "] and col_vars[", nf, "] must share one dtype");
      ++nf;
    } else {
      TORCH_CHECK(nv < variances.size(), "dlopt: variances needs one tensor per param of 0 or "
                  "1 dims, got ", variances.size());
      check_like_param(p, variances[nv], "variances", nv);
      check_dtype(p, variances[nv], "variances", nv);
      ++nv;
    }
  }
  TORCH_CHECK(nf == row_vars.size() && nf == col_vars.size(), "dlopt: row_vars / col_vars have ",
              row_vars.size(), " / ", col_vars.size(), " tensors but ", nf,
              " params have 2 or more dims");
  TORCH_CHECK(nv == variances.size(), "dlopt: variances has ", variances.size(), " tensors but ",
              nv, " params have 0 or 1 dims");
}

}  // namespace dlopt
