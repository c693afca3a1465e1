// Weight decay, shared by every optimizer's maths header (one copy per layer; the
// Triton and reference twins are `decoupled_decay_factor` in their _common.py).
#pragma once
#include "dlopt/macros.h"

namespace dlopt {

// Decoupled weight decay (AdamW, Lion, Adafactor): p <- p * (1 - lr * weight_decay),
// the factor computed in double from the host-side values and rounded once to fp32,
// as torch does (`param.mul_(1 - lr * weight_decay)`).
DLOPT_HD float decoupled_decay_factor(double lr, double weight_decay) {
  return static_cast<float>(1.0 - lr * weight_decay);
}

// L2 weight decay (Adam, SGD, RMSprop, Adagrad): the penalty's gradient added to g.
DLOPT_HD float l2_decayed_grad(float g, float p, float weight_decay) {
  return g + weight_decay * p;
}

}  // namespace dlopt
