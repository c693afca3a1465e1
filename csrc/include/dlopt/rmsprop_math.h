// The RMSprop per-element update (Hinton, Srivastava & Swersky, Neural Networks for
// Machine Learning, lecture 6e; the centered variant of Graves 2013, "Generating
// Sequences With Recurrent Neural Networks"; as torch.optim.RMSprop): one copy of the
// maths, called by the C++ CPU kernel and the CUDA kernel (the Triton kernel and the
// pure-torch reference transcribe the same lines). fp32 arithmetic whatever the storage
// dtype (double for float64 params, on the CPU); `1 - alpha` is computed in double on
// the host and rounded once.
//
//   g   = g + wd * p                               (weight_decay != 0)
//   v   = alpha * v + (1 - alpha) * g * g
//   ga  = ga + (1 - alpha) * (g - ga)              (centered: lerp, as torch)
//   avg = sqrt(v - ga * ga) + eps                  (centered; sqrt(v) + eps otherwise)
//   b   = momentum * b + g / avg;  p = p - lr * b  (momentum > 0)
//   p   = p - lr * g / avg                         (otherwise)
#pragma once
#include <cmath>
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// C: the arithmetic's type (fp32; double for float64 params, on the CPU).
template <class C>
struct RmspropCoeffsOf {
  using Compute = C;
  C lr;
  C alpha;
  C one_minus_alpha;  // 1 - alpha, exact in double then rounded once
  C eps;
  C weight_decay;
  C momentum;
};
using RmspropCoeffs = RmspropCoeffsOf<float>;

template <class C = float>
DLOPT_HD RmspropCoeffsOf<C> rmsprop_coeffs(double lr, double alpha, double eps,
                                           double weight_decay, double momentum) {
  RmspropCoeffsOf<C> c;
  c.lr = static_cast<C>(lr);
  c.alpha = static_cast<C>(alpha);
  c.one_minus_alpha = static_cast<C>(1.0 - alpha);
  c.eps = static_cast<C>(eps);
  c.weight_decay = static_cast<C>(weight_decay);
  c.momentum = static_cast<C>(momentum);
  return c;
}

// One element. `g` is already unscaled (divided by the grad scale) and negated for
// maximize. `ga` is read only when CENTERED, `buf` only with MOMENTUM. Template flags
// keep the loop body branch-free so it vectorizes.
template <bool WEIGHT_DECAY, bool CENTERED, bool MOMENTUM, class C>
DLOPT_HD void rmsprop_update(C& p, C g, C& v, C& ga, C& buf, const RmspropCoeffsOf<C>& c) {
  if (WEIGHT_DECAY) g = l2_decayed_grad(g, p, c.weight_decay);
  v = fmadd(c.alpha, v, c.one_minus_alpha * (g * g));
  C avg;
  if (CENTERED) {
    ga = ga + c.one_minus_alpha * (g - ga);
    avg = sqrt_of(v - ga * ga) + c.eps;
  } else {
    avg = sqrt_of(v) + c.eps;
  }
  if (MOMENTUM) {
    buf = c.momentum * buf + g / avg;
    p = p - c.lr * buf;
  } else {
    p = p - c.lr * g / avg;
  }
}

}  // namespace dlopt
