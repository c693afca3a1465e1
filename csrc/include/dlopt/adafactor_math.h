// Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
// Memory Cost"), as torch.optim.Adafactor (torch 2.5+) computes it: one copy of the
// maths, called by the C++ CPU kernel and the CUDA kernels (the Triton kernels and the
// pure-torch reference transcribe the same lines). Per param at step t, with g the
// grad (negated under maximize), w = t^beta2_decay and rho = min(lr, 1/sqrt(t)):
//
//   alpha = max(eps2, rms(p)) * rho                  (p before weight decay)
//   p     = p * (1 - lr * weight_decay)
//   >= 2-D (factored over the last two dims; leading dims are a batch):
//     R = lerp(R, mean_c(g^2), w)   C = lerp(C, mean_r(g^2), w)
//     v = R C / max(mean_r(R), eps1)
//   0-D / 1-D:  v = V = lerp(V, g^2, w)
//   u     = g / sqrt(max(v, eps1^2))
//   p     = p - alpha / max(1, rms(u) / d) * u
//
// The sums of squares (rms(p), rms(u), the row and column means) are accumulated in
// double; per-element arithmetic is fp32, as in torch's fp32 path (double for float64
// params, in the C++ CPU kernel).
#pragma once
#include <cmath>
#include "dlopt/macros.h"
#include "dlopt/weight_decay.h"

namespace dlopt {

// Arithmetic in C: fp32 whatever the storage dtype, or double for float64 params (the
// C++ CPU kernel only).
template <class C>
struct AdafactorCoeffsOf {
  C one_minus_beta2;  // lerp weight of the new squared-gradient mean: t^beta2_decay
  C decay_factor;     // 1 - lr * weight_decay
  double rho;         // relative step size min(lr, 1 / sqrt(t))
};
using AdafactorCoeffs = AdafactorCoeffsOf<float>;

// Per tensor, in double from the host values, as torch computes them in Python.
template <class C = float>
DLOPT_HD AdafactorCoeffsOf<C> adafactor_coeffs(double lr, double step, double beta2_decay,
                                               double weight_decay) {
  AdafactorCoeffsOf<C> c;
  c.one_minus_beta2 = static_cast<C>(pow(step, beta2_decay));
  const double inv_sqrt = 1.0 / sqrt(step);
  c.rho = lr < inv_sqrt ? lr : inv_sqrt;
  c.decay_factor = decoupled_decay_factor<C>(lr, weight_decay);
  return c;
}

// torch.lerp(a, b, w): w < 0.5 ? a + w (b - a) : b - (b - a) (1 - w), so that w = 1
// (every first step) gives b exactly.
template <class C>
DLOPT_HD C lerp_torch(C a, C b, C w) {
  const C diff = b - a;
  return w < C(0.5) ? a + w * diff : b - diff * (C(1) - w);
}

// The variance estimate of a factored element: R[r] C[c] / den, den = max(mean(R), eps1).
template <class C>
DLOPT_HD C factored_variance(C row_var, C col_var, C den) {
  return (row_var * col_var) / den;
}

// max(mean, eps1), NaN kept (torch's clamp_min propagates NaN).
template <class C>
DLOPT_HD C clamp_min_nan(C x, C lo) { return x < lo ? lo : x; }

// One element of the update direction: g / sqrt(max(v, eps1^2)) (torch: clamp_min,
// rsqrt, mul).
template <class C>
DLOPT_HD C adafactor_direction(C g, C v, C eps1_sq) {
  return g * (C(1) / sqrt_of(clamp_min_nan(v, eps1_sq)));
}

// The per-tensor step size alpha / max(1, rms(u) / d), alpha = max(eps2, rms(p)) rho.
// Python's max(x, nan) is x, as fmax.
DLOPT_HD double adafactor_step_size(double sum_p2, double sum_u2, double numel, double eps2,
                                    double rho, double d) {
  const double sqrt_n = sqrt(numel);
  const double alpha = fmax(eps2, sqrt(sum_p2) / sqrt_n) * rho;
  const double denom = fmax(1.0, sqrt(sum_u2) / (sqrt_n * d));
  return alpha / denom;
}

// The final update of one element (p already loaded in fp32, u its direction).
template <bool WEIGHT_DECAY, class C>
DLOPT_HD C adafactor_apply(C p, C u, C decay_factor, C step_size) {
  return WEIGHT_DECAY ? decayed_minus(p, decay_factor, step_size * u) : p - step_size * u;
}

}  // namespace dlopt
