// LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT
// in 76 minutes", https://arxiv.org/abs/1904.00962, Algorithm 2), one copy of the
// maths for the C++ CPU kernel and the CUDA kernel (the Triton kernel and the
// pure-torch reference transcribe the same lines). Per tensor, step t:
//
//   g  = grad / grad_scale * clip     clip = max_grad_norm / ||all grads|| if that
//                                     norm is above max_grad_norm, else 1 (apex)
//   m  = beta1 * m + (1 - beta1) * g                    adam_moments (adam_math.h)
//   v  = beta2 * v + (1 - beta2) * g^2
//   u  = m_hat / (sqrt(v_hat) + eps) + weight_decay * p
//        m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) (bias_correction)
//   p -= lr * trust * u,   trust = ||p|| / ||u||  (1 if either norm is 0)
//
// The kernels make two passes: the first updates m, v and sums p^2 and u^2 per
// chunk; the second recomputes u from the stored m, v (so it is bit for bit the u
// whose norm was taken) and updates p. Arithmetic is fp32 per element; norms and
// the trust ratio are computed in double. (double per element too for float64 params,
// in the C++ CPU kernel: the templates' C.)
#pragma once
#include "dlopt/adam_math.h"
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// Adam's coefficients with lr = 1 (lr goes with the trust ratio): step_size is
// 1 / (1 - beta1^t) and inv_bc2_sqrt 1 / sqrt(1 - beta2^t), or both 1 without bias
// correction.
template <class C = float>
DLOPT_HD AdamCoeffsOf<C> lamb_coeffs(double step, double beta1, double beta2,
                                     double weight_decay, double eps, bool bias_correction) {
  AdamCoeffsOf<C> c = adam_coeffs<C>(1.0, step, beta1, beta2, weight_decay, eps);
  if (!bias_correction) {
    c.step_size = C(1);
    c.inv_bc2_sqrt = C(1);
  }
  return c;
}

// u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, from the moments as stored.
// The decay term is the L2 penalty's gradient, added to the update.
template <bool WEIGHT_DECAY, class C>
DLOPT_HD C lamb_direction(C p, C m, C v, const AdamCoeffsOf<C>& c) {
  const C u = adam_direction(m, v, c);
  return WEIGHT_DECAY ? l2_decayed_grad(u, p, c.weight_decay) : u;
}

// Global grad-norm clipping as NVIDIA apex's FusedLAMB (max_grad_norm): the grads
// are scaled by max_norm / global_norm when global_norm (of the unscaled grads)
// exceeds max_norm; a factor of 1 otherwise, or when max_norm <= 0 (off).
DLOPT_HD double lamb_clip_factor(double global_norm, double max_norm) {
  return (max_norm > 0.0 && global_norm > max_norm) ? max_norm / global_norm : 1.0;
}

// ||p|| / ||u||, and 1 when either norm is 0 (or NaN).
DLOPT_HD double lamb_trust_ratio(double p_norm, double u_norm) {
  return (p_norm > 0.0 && u_norm > 0.0) ? p_norm / u_norm : 1.0;
}

}  // namespace dlopt
