// The Lion per-element update (Chen et al. 2023, "Symbolic Discovery of Optimization
// Algorithms", Algorithm 2): one copy of the maths, called by the C++ CPU kernel and
// the CUDA kernel (the Triton kernel and the pure-torch reference transcribe the same
// lines). fp32 arithmetic whatever the storage dtype (double for float64 params, on the
// CPU); `1 - beta` and the decay factor
// are computed in double on the host and rounded once.
//
//   c = beta1 * m + (1 - beta1) * g        interpolation for the update
//   p = p * (1 - lr * wd) - lr * sign(c)   decoupled weight decay, sign update
//   m = beta2 * m + (1 - beta2) * g        momentum
#pragma once
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// C: the arithmetic's type (fp32; double for float64 params, on the CPU).
template <class C>
struct LionCoeffsOf {
  using Compute = C;
  C lr;
  C beta1;
  C one_minus_beta1;  // 1 - beta1, exact in double then rounded once
  C beta2;
  C one_minus_beta2;
  C decay_factor;     // 1 - lr * weight_decay
};
using LionCoeffs = LionCoeffsOf<float>;

template <class C = float>
DLOPT_HD LionCoeffsOf<C> lion_coeffs(double lr, double beta1, double beta2, double weight_decay) {
  LionCoeffsOf<C> c;
  c.lr = static_cast<C>(lr);
  c.beta1 = static_cast<C>(beta1);
  c.one_minus_beta1 = static_cast<C>(1.0 - beta1);
  c.beta2 = static_cast<C>(beta2);
  c.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  c.decay_factor = decoupled_decay_factor<C>(lr, weight_decay);
  return c;
}

// -1, 0 or +1 as torch.sign, but NaN for NaN (x * 0 keeps NaN, gives +-0 for +-0):
// a NaN grad then shows in its param element, as with every other optimizer, instead
// of freezing it silently (torch.sign(NaN) is 0, and the momentum stays NaN).
template <class C>
DLOPT_HD C sign_of(C x) {
  return x > C(0) ? C(1) : (x < C(0) ? C(-1) : x * C(0));
}

// One element. `g` is already unscaled (divided by the grad scale) and negated
// for maximize. The template flag keeps the loop body branch-free.
template <bool WEIGHT_DECAY, class C>
DLOPT_HD void lion_update(C& p, C g, C& m, const LionCoeffsOf<C>& c) {
  const C u = fmadd(c.beta1, m, c.one_minus_beta1 * g);
  const C step = c.lr * sign_of(u);
  p = WEIGHT_DECAY ? decayed_minus(p, c.decay_factor, step) : p - step;
  m = fmadd(c.beta2, m, c.one_minus_beta2 * g);
}

}  // namespace dlopt
