// Vector norms of many tensors (torch.linalg.vector_norm's `ord`), one copy of the
// maths for the C++ CPU kernel and the CUDA kernel of dlopt::multi_tensor_norm, and
// for LAMB's per-tensor norms (the Triton kernel and the pure-torch reference
// transcribe the same lines).
//
// A norm is computed in three steps, so that chunks of a tensor can be reduced in
// parallel and combined in a fixed order:
//   term(x)        the contribution of one element      x^2, |x|, |x|^p, [x != 0]
//   combine(a, b)  of two partial results               a + b, or max / min (NaN wins)
//   finish(raw)    the norm from the combined raw value  sqrt(raw), raw^(1/p), raw
// The total over tensors is vector_norm(per-tensor norms, ord), which for every ord
// but 0 is finish(combine of all raws), i.e. the norm of all elements as one vector.
// An empty tensor contributes the identity of combine (0, or +inf for ord = -inf).
#pragma once
#include <cmath>
#include <cstdint>
#include "dlopt/macros.h"

namespace dlopt {

enum class NormKind : int32_t { kL2 = 0, kL1 = 1, kInf = 2, kNegInf = 3, kL0 = 4, kP = 5 };

DLOPT_HD NormKind norm_kind(double ord) {
  if (ord == 2.0) return NormKind::kL2;
  if (ord == 1.0) return NormKind::kL1;
  if (ord > 1.7976931348623157e308) return NormKind::kInf;
  if (ord < -1.7976931348623157e308) return NormKind::kNegInf;
  if (ord == 0.0) return NormKind::kL0;
  return NormKind::kP;
}

// Reductions whose result is a max / min (the others are sums).
DLOPT_HD bool norm_is_max(NormKind k) { return k == NormKind::kInf; }
DLOPT_HD bool norm_is_min(NormKind k) { return k == NormKind::kNegInf; }

// max / min that propagate NaN (as torch.max / torch.amax do), whichever side it is on.
template <class T>
DLOPT_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <class T>
DLOPT_HD T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}

template <class T>
DLOPT_HD T norm_identity(NormKind k) {
  return norm_is_min(k) ? static_cast<T>(INFINITY) : static_cast<T>(0);
}

template <class T>
DLOPT_HD T norm_combine(NormKind k, T a, T b) {
  if (norm_is_max(k)) return nan_max(a, b);
  if (norm_is_min(k)) return nan_min(a, b);
  return a + b;
}

// One element's contribution; `p` is the ord (used by kP only).
template <class T>
DLOPT_HD T norm_term(NormKind k, T x, T p) {
  switch (k) {
    case NormKind::kL2: return x * x;
    case NormKind::kL0: return x != static_cast<T>(0) ? static_cast<T>(1) : static_cast<T>(0);
    case NormKind::kP: return pow(fabs(x), p);
    default: return fabs(x);  // kL1, kInf, kNegInf
  }
}

// The norm from a raw (combined) value, in double.
DLOPT_HD double norm_finish(NormKind k, double raw, double ord) {
  switch (k) {
    case NormKind::kL2: return sqrt(raw);
    case NormKind::kP: return pow(raw, 1.0 / ord);
    default: return raw;
  }
}

// vector_norm(per-tensor norms, ord) from the per-tensor raw values, accumulated one
// tensor at a time: start from norm_identity, add each with norm_total_add, then
// norm_total_finish. For ord = 0 the total counts the tensors with a non-zero norm
// (torch's clip_grad_norm_ total for ord 0); otherwise it is the norm of everything.
DLOPT_HD double norm_total_add(NormKind k, double acc, double raw) {
  if (k == NormKind::kL0) return acc + (raw != 0.0 ? 1.0 : 0.0);
  return norm_combine(k, acc, raw);
}

DLOPT_HD double norm_total_finish(NormKind k, double acc, double ord) {
  return k == NormKind::kL0 ? acc : norm_finish(k, acc, ord);
}

}  // namespace dlopt
