// The SGD per-element update (torch.optim.SGD: momentum, dampening, Nesterov, L2
// weight decay): one copy of the maths, called by the C++ CPU kernel and the CUDA
// kernel (the Triton kernel and the pure-torch reference transcribe the same lines).
// fp32 arithmetic whatever the storage dtype (double for float64 params, on the CPU);
// `1 - dampening` is computed in double on the host and rounded once.
//
//   g = g + wd * p                              (weight_decay != 0)
//   b = g                                       first step of a buffer (torch: a clone of g)
//   b = momentum * b + (1 - dampening) * g      later steps
//   g = nesterov ? g + momentum * b : b         (momentum != 0)
//   p = p - lr * g
#pragma once
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// C: the arithmetic's type (fp32; double for float64 params, on the CPU).
template <class C>
struct SgdCoeffsOf {
  using Compute = C;
  C lr;
  C weight_decay;
  C momentum;
  C one_minus_dampening;  // 1 - dampening, exact in double then rounded once
};
using SgdCoeffs = SgdCoeffsOf<float>;

template <class C = float>
DLOPT_HD SgdCoeffsOf<C> sgd_coeffs(double lr, double weight_decay, double momentum,
                                   double dampening) {
  SgdCoeffsOf<C> c;
  c.lr = static_cast<C>(lr);
  c.weight_decay = static_cast<C>(weight_decay);
  c.momentum = static_cast<C>(momentum);
  c.one_minus_dampening = static_cast<C>(1.0 - dampening);
  return c;
}

// One element. `g` is already unscaled (divided by the grad scale) and negated for
// maximize. `first`: the momentum buffer has no history yet and becomes g (its old
// value is not read). Template flags keep the loop body branch-free so it vectorizes;
// `first` is uniform per tensor, so callers hoist it too.
template <bool WEIGHT_DECAY, bool MOMENTUM, bool NESTEROV, class C>
DLOPT_HD void sgd_update(C& p, C g, C& buf, bool first, const SgdCoeffsOf<C>& c) {
  if (WEIGHT_DECAY) g = l2_decayed_grad(g, p, c.weight_decay);
  if (MOMENTUM) {
    buf = first ? g : fmadd(c.momentum, buf, c.one_minus_dampening * g);
    g = NESTEROV ? g + c.momentum * buf : buf;
  }
  p = p - c.lr * g;
}

}  // namespace dlopt
