// The list checks and layout helpers of dlopt/tensor_lists.h, compiled by g++ for both
// the CPU and the CUDA library (setup.py), so no TORCH_CHECK is ever built by nvcc.
#include "dlopt/tensor_lists.h"

#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <optional>

namespace dlopt {

AlignedLists::AlignedLists(std::initializer_list<at::TensorList> lists,
                           std::initializer_list<bool> mutated)
    : lists_(lists), slot_(lists.size()) {
  TORCH_INTERNAL_ASSERT(mutated.size() == lists.size());
  const std::vector<bool> writes(mutated);
  const at::TensorList params = lists_[0];
  auto replace = [&](size_t k, size_t i, const at::Tensor& scratch) {
    if (slot_[k].empty()) slot_[k].assign(lists_[k].size(), -1);
    slot_[k][i] = static_cast<int32_t>(copies_.size());
    copies_.push_back(scratch);
    if (writes[k]) writeback_.emplace_back(lists_[k][i], scratch);
  };
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i];
    if (!p.is_non_overlapping_and_dense()) {
      p = p.contiguous();
      replace(0, i, p);
    }
    for (size_t k = 1; k < lists_.size(); ++k) {
      if (lists_[k].empty()) continue;
      const at::Tensor& t = lists_[k][i];
      if (t.strides() == p.strides() && t.is_non_overlapping_and_dense()) continue;
      at::Tensor tw = at::empty_like(p, t.options());
      tw.copy_(t);
      replace(k, i, tw);
    }
  }
}

void AlignedLists::finish() {
  for (auto& pr : writeback_) pr.first.copy_(pr.second);
  writeback_.clear();
}

at::Tensor ContiguousCopies::get(const at::Tensor& t, bool mutated) {
  if (!t.defined() || t.is_contiguous()) return t;
  copies_.push_back({t, t.contiguous(), mutated});
  return copies_.back().copy;
}

void ContiguousCopies::finish() {
  for (auto& c : copies_)
    if (c.mutated) c.orig.copy_(c.copy);
  copies_.clear();
}

void check_same_length(at::TensorList ref, at::TensorList other, const char* name,
                       bool may_be_empty) {
  TORCH_CHECK((may_be_empty && other.empty()) || other.size() == ref.size(), "dlopt: ", name,
              " has ", other.size(), " tensors but params has ", ref.size());
}

void check_like_param(const at::Tensor& p, const at::Tensor& t, const char* name, size_t i) {
  TORCH_CHECK(t.sizes() == p.sizes(), "dlopt: ", name, "[", i, "] has shape ", t.sizes(),
              " but params[", i, "] has shape ", p.sizes());
  TORCH_CHECK(t.device() == p.device(), "dlopt: ", name, "[", i, "] is on ", t.device(),
              " but params[", i, "] is on ", p.device());
}

void check_elementwise_lists(at::TensorList params, at::TensorList grads,
                             c10::ArrayRef<NamedList> states, at::TensorList master_params,
                             at::TensorList state_steps, bool use_sr, bool has_steps) {
  check_same_length(params, grads, "grads", false);
  for (const auto& s : states) check_same_length(params, s.list, s.name, false);
  check_same_length(params, master_params, "master_params", true);
  check_same_length(params, state_steps, "state_steps", !has_steps);  // SGD keeps none
  const bool use_master = !master_params.empty();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
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

void check_factored_lists(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                          at::TensorList col_vars, at::TensorList variances,
                          at::TensorList master_params, at::TensorList state_steps, bool use_sr) {
  check_elementwise_lists(params, grads, {}, master_params, state_steps, use_sr);
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
  for (const at::Tensor& p : params) {
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
