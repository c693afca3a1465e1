// The Adagrad per-element update (Duchi, Hazan & Singer 2011, as torch.optim.Adagrad:
// L2 weight decay, lr decay by step): one copy of the maths, called by the C++ CPU
// kernel and the CUDA kernel (the Triton kernel and the pure-torch reference transcribe
// the same lines). fp32 arithmetic whatever the storage dtype (double for float64
// params, on the CPU); the per-tensor learning
// rate is computed in double from the tensor's step count and rounded once.
//
//   g   = g + wd * p                          (weight_decay != 0)
//   clr = lr / (1 + (step - 1) * lr_decay)    per tensor, step already incremented
//   sum = sum + g * g
//   p   = p - clr * g / (sqrt(sum) + eps)
#pragma once
#include <cmath>
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// C: the arithmetic's type (fp32; double for float64 params, on the CPU).
template <class C>
struct AdagradCoeffsOf {
  using Compute = C;
  C clr;  // lr / (1 + (step - 1) * lr_decay)
  C weight_decay;
  C eps;
};
using AdagradCoeffs = AdagradCoeffsOf<float>;

template <class C = float>
DLOPT_HD AdagradCoeffsOf<C> adagrad_coeffs(double lr, double step, double lr_decay,
                                           double weight_decay, double eps) {
  AdagradCoeffsOf<C> c;
  c.clr = static_cast<C>(lr / (1.0 + (step - 1.0) * lr_decay));
  c.weight_decay = static_cast<C>(weight_decay);
  c.eps = static_cast<C>(eps);
  return c;
}

// One element. `g` is already unscaled (divided by the grad scale) and negated for
// maximize. The template flag keeps the loop body branch-free so it vectorizes.
template <bool WEIGHT_DECAY, class C>
DLOPT_HD void adagrad_update(C& p, C g, C& sum, const AdagradCoeffsOf<C>& c) {
  if (WEIGHT_DECAY) g = l2_decayed_grad(g, p, c.weight_decay);
  sum = sum + g * g;
  const C std_ = sqrt_of(sum) + c.eps;
  p = p - c.clr * g / std_;
}

}  // namespace dlopt
