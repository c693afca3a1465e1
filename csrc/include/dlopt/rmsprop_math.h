// The RMSprop per-element update (Hinton, Srivastava & Swersky, Neural Networks for
// Machine Learning, lecture 6e; the centered variant of Graves 2013, "Generating
// Sequences With Recurrent Neural Networks"; as torch.optim.RMSprop): one copy of the
// maths, called by the C++ CPU kernel and the CUDA kernel (the Triton kernel and the
// pure-torch reference transcribe the same lines). fp32 arithmetic whatever the storage
// dtype; `1 - alpha` is computed in double on the host and rounded once.
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

struct RmspropCoeffs {
  float lr;
  float alpha;
  float one_minus_alpha;  // 1 - alpha, exact in double then rounded once
  float eps;
  float weight_decay;
  float momentum;
};

DLOPT_HD RmspropCoeffs rmsprop_coeffs(double lr, double alpha, double eps, double weight_decay,
                                      double momentum) {
  RmspropCoeffs c;
  c.lr = static_cast<float>(lr);
  c.alpha = static_cast<float>(alpha);
  c.one_minus_alpha = static_cast<float>(1.0 - alpha);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.momentum = static_cast<float>(momentum);
  return c;
}

// One element. `g` is already unscaled (divided by the grad scale) and negated for
// maximize. `ga` is read only when CENTERED, `buf` only with MOMENTUM. Template flags
// keep the loop body branch-free so it vectorizes.
template <bool WEIGHT_DECAY, bool CENTERED, bool MOMENTUM>
DLOPT_HD void rmsprop_update(float& p, float g, float& v, float& ga, float& buf,
                             const RmspropCoeffs& c) {
  if (WEIGHT_DECAY) g = l2_decayed_grad(g, p, c.weight_decay);
  v = fmadd(c.alpha, v, c.one_minus_alpha * (g * g));
  float avg;
  if (CENTERED) {
    ga = ga + c.one_minus_alpha * (g - ga);
    avg = sqrtf(v - ga * ga) + c.eps;
  } else {
    avg = sqrtf(v) + c.eps;
  }
  if (MOMENTUM) {
    buf = c.momentum * buf + g / avg;
    p = p - c.lr * buf;
  } else {
    p = p - c.lr * g / avg;
  }
}

}  // namespace dlopt
