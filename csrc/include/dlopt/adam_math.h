// The Adam / AdamW per-element update: one copy of the maths, called by the C++
// CPU kernel and the CUDA kernel (the Triton kernel and the pure-torch reference
// transcribe the same lines). Arithmetic is fp32 whatever the storage dtype (double for
// float64 params, on the CPU);
// the per-tensor coefficients are computed in double from the step count, as
// torch's fused kernels do, so `1 - beta2` is exact before it is rounded.
#pragma once
#include <cmath>
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// Arithmetic in C: fp32 whatever the storage dtype, or double for float64 params (the
// C++ CPU kernel only).
template <class C>
struct AdamCoeffsOf {
  using Compute = C;
  C lr;               // learning rate
  C step_size;        // lr / (1 - beta1^step)
  C inv_bc2_sqrt;     // 1 / sqrt(1 - beta2^step)
  C one_minus_beta1;  // 1 - beta1, exact in double then rounded once
  C beta2;
  C one_minus_beta2;
  C weight_decay;     // L2 (Adam) coefficient
  C decay_factor;     // 1 - lr * weight_decay (AdamW, decoupled)
  C eps;
};
using AdamCoeffs = AdamCoeffsOf<float>;

template <class C = float>
DLOPT_HD AdamCoeffsOf<C> adam_coeffs(double lr, double step, double beta1, double beta2,
                                     double weight_decay, double eps) {
  AdamCoeffsOf<C> c;
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  c.lr = static_cast<C>(lr);
  c.step_size = static_cast<C>(lr / bc1);
  c.inv_bc2_sqrt = static_cast<C>(1.0 / sqrt(bc2));
  c.one_minus_beta1 = static_cast<C>(1.0 - beta1);
  c.beta2 = static_cast<C>(beta2);
  c.one_minus_beta2 = static_cast<C>(1.0 - beta2);
  c.weight_decay = static_cast<C>(weight_decay);
  c.decay_factor = decoupled_decay_factor<C>(lr, weight_decay);
  c.eps = static_cast<C>(eps);
  return c;
}

// The moment updates, shared with LAMB (lamb_math.h).
template <class C>
DLOPT_HD void adam_moments(C g, C& m, C& v, const AdamCoeffsOf<C>& c) {
  m = m + c.one_minus_beta1 * (g - m);  // lerp(m, g, 1 - beta1), as torch
  v = fmadd(c.beta2, v, c.one_minus_beta2 * (g * g));
}

// The bias-corrected step direction step_size * m / (sqrt(v_hat / bc2) + eps); with
// lr = 1 in adam_coeffs it is m_hat / (sqrt(v_hat) + eps) (LAMB's Adam ratio).
template <class C>
DLOPT_HD C adam_direction(C m, C v_hat, const AdamCoeffsOf<C>& c) {
  const C denom = sqrt_of(v_hat) * c.inv_bc2_sqrt + c.eps;
  return c.step_size * (m / denom);
}

// One element. `g` is already unscaled (divided by the grad scale) and negated
// for maximize. Template flags keep the loop body branch-free so it vectorizes.
template <bool ADAMW, bool AMSGRAD, bool WEIGHT_DECAY, class C>
DLOPT_HD void adam_update(C& p, C g, C& m, C& v, C& vmax, const AdamCoeffsOf<C>& c) {
  if (WEIGHT_DECAY && !ADAMW) g = l2_decayed_grad(g, p, c.weight_decay);
  adam_moments(g, m, v, c);
  C v_hat = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    v_hat = vmax;
  }
  const C step = adam_direction(m, v_hat, c);
  p = (WEIGHT_DECAY && ADAMW) ? decayed_minus(p, c.decay_factor, step) : p - step;
}

}  // namespace dlopt
