// The Adam / AdamW per-element update: one copy of the maths, called by the C++
// CPU kernel and the CUDA kernel (the Triton kernel and the pure-torch reference
// transcribe the same lines). Arithmetic is fp32 whatever the storage dtype;
// the per-tensor coefficients are computed in double from the step count, as
// torch's fused kernels do, so `1 - beta2` is exact before it is rounded.
#pragma once
#include <cmath>
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

struct AdamCoeffs {
  float lr;               // learning rate
  float step_size;        // lr / (1 - beta1^step)
  float inv_bc2_sqrt;     // 1 / sqrt(1 - beta2^step)
  float one_minus_beta1;  // 1 - beta1, exact in double then rounded once
  float beta2;
  float one_minus_beta2;
  float weight_decay;     // L2 (Adam) coefficient
  float decay_factor;     // 1 - lr * weight_decay (AdamW, decoupled)
  float eps;
};

DLOPT_HD AdamCoeffs adam_coeffs(double lr, double step, double beta1, double beta2,
                                double weight_decay, double eps) {
  AdamCoeffs c;
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  c.lr = static_cast<float>(lr);
  c.step_size = static_cast<float>(lr / bc1);
  c.inv_bc2_sqrt = static_cast<float>(1.0 / sqrt(bc2));
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.weight_decay = static_cast<float>(weight_decay);
  c.decay_factor = decoupled_decay_factor(lr, weight_decay);
  c.eps = static_cast<float>(eps);
  return c;
}

// The moment updates, shared with LAMB (lamb_math.h).
DLOPT_HD void adam_moments(float g, float& m, float& v, const AdamCoeffs& c) {
  m = m + c.one_minus_beta1 * (g - m);  // lerp(m, g, 1 - beta1), as torch
  v = fmadd(c.beta2, v, c.one_minus_beta2 * (g * g));
}

// The bias-corrected step direction step_size * m / (sqrt(v_hat / bc2) + eps); with
// lr = 1 in adam_coeffs it is m_hat / (sqrt(v_hat) + eps) (LAMB's Adam ratio).
DLOPT_HD float adam_direction(float m, float v_hat, const AdamCoeffs& c) {
  const float denom = sqrtf(v_hat) * c.inv_bc2_sqrt + c.eps;
  return c.step_size * (m / denom);
}

// One element. `g` is already unscaled (divided by the grad scale) and negated
// for maximize. Template flags keep the loop body branch-free so it vectorizes.
template <bool ADAMW, bool AMSGRAD, bool WEIGHT_DECAY>
DLOPT_HD void adam_update(float& p, float g, float& m, float& v, float& vmax,
                          const AdamCoeffs& c) {
  if (WEIGHT_DECAY && !ADAMW) g = l2_decayed_grad(g, p, c.weight_decay);
  adam_moments(g, m, v, c);
  float v_hat = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    v_hat = vmax;
  }
  const float step = adam_direction(m, v_hat, c);
  p = (WEIGHT_DECAY && ADAMW) ? decayed_minus(p, c.decay_factor, step) : p - step;
}

}  // namespace dlopt
