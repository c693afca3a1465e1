// Weight decay, shared by every optimizer's maths header (one copy per layer; the
// Triton and reference twins are `decoupled_decay_factor` in their _common.py).
#pragma once
#include <cmath>
#include <type_traits>
#include "dlopt/macros.h"

namespace dlopt {

// a * b + c rounded once: the only FMAs of every backend. No compiler fuses on its own
// (g++ -ffp-contract=off, nvcc --fmad=false, Triton enable_fp_fusion=False: setup.py,
// triton/_common.py), so the fused ones are these, written where the maths wants them.
// Left to a compiler, which product of a*b + c*d it fuses is its choice, possibly a
// different one in the code paths of one loop (vector body, masked or scalar
// remainder), and a backend's own (g++ fused Adam's m + (1 - beta1) * (g - m), nvcc
// did not: tests/test_cuda_launch_emulation.py). Without FMA hardware (no __FMA__) the
// CPU build computes a * b + c in two roundings.
DLOPT_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The same in double, for the CPU kernels' float64 arithmetic (float64 params).
DLOPT_HD double fmadd(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#elif defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// sqrt in the arithmetic's precision (sqrtf for fp32: the maths headers' float code
// is the same whichever precision the templates are instantiated with).
DLOPT_HD float sqrt_of(float x) { return sqrtf(x); }
DLOPT_HD double sqrt_of(double x) { return sqrt(x); }

// Decoupled weight decay (AdamW, Lion, Adafactor): p <- p * (1 - lr * weight_decay),
// the factor computed in double from the host-side values and rounded once to the
// arithmetic's precision C (fp32; double for float64 params), as torch does
// (`param.mul_(1 - lr * weight_decay)`).
template <class C = float>
DLOPT_HD C decoupled_decay_factor(double lr, double weight_decay) {
  return static_cast<C>(1.0 - lr * weight_decay);
}

// p * decay_factor - delta: the decayed param minus the step, one rounding (fmadd).
template <class C>
DLOPT_HD C decayed_minus(C p, C decay_factor, C delta) {
  return fmadd(p, decay_factor, -delta);
}

// L2 weight decay (Adam, SGD, RMSprop, Adagrad, LAMB's update): the penalty's gradient
// added to g. In double (float64 params, CPU kernels) rounded once (fmadd), as torch's
// CPU `grad.add(param, alpha=weight_decay)` computes it: with two roundings, a g that
// nearly cancels weight_decay * p kept the product's rounding error, large against the
// small sum, and a float64 RMSprop momentum buffer came out thousands of ulps from
// torch's (tests/optim/test_wide_dtypes.py test_l2_decay_of_cancelling_grads_...). In
// fp32 two roundings, well inside the fp32 tolerance: the fused form made ptxas spill
// registers in the heaviest CUDA RMSprop instantiation (fp16 params, fp32 states,
// centered, momentum; python tools/check_cuda.py).
template <class C>
DLOPT_HD C l2_decayed_grad(C g, C p, C weight_decay) {
  if constexpr (std::is_same_v<C, double>) {
    return fmadd(weight_decay, p, g);
  } else {
    return g + weight_decay * p;
  }
}

}  // namespace dlopt
