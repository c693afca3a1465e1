// Weight decay, shared by every optimizer's maths header (one copy per layer; the
// Triton and reference twins are `decoupled_decay_factor` in their _common.py).
#pragma once
#include <cmath>
#include "dlopt/macros.h"

namespace dlopt {

// a * b + c rounded once, written out wherever an expression sums two products
// (a*b + c*d). Left to the compiler, which product such a sum fuses into an FMA is its
// choice, and it may choose differently in the code paths of one loop (vector body,
// masked or scalar remainder): an element's result could then depend on where it falls
// in its tensor. Named here, every path and every element computes the same. (One full
// test run with 512-bit vectors saw a transposed param step differently from a
// contiguous copy in Lion; it did not recur, before or after this change.) Without
// FMA hardware gcc contracts nothing, and neither does this.
DLOPT_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Decoupled weight decay (AdamW, Lion, Adafactor): p <- p * (1 - lr * weight_decay),
// the factor computed in double from the host-side values and rounded once to fp32,
// as torch does (`param.mul_(1 - lr * weight_decay)`).
DLOPT_HD float decoupled_decay_factor(double lr, double weight_decay) {
  return static_cast<float>(1.0 - lr * weight_decay);
}

// p * decay_factor - delta: the decayed param minus the step, one rounding (fmadd).
DLOPT_HD float decayed_minus(float p, float decay_factor, float delta) {
  return fmadd(p, decay_factor, -delta);
}

// L2 weight decay (Adam, SGD, RMSprop, Adagrad): the penalty's gradient added to g.
DLOPT_HD float l2_decayed_grad(float g, float p, float weight_decay) {
  return g + weight_decay * p;
}

}  // namespace dlopt
