"""The one table of test tolerances, by storage dtype of the params.

fp32: kernels and torch differ only in rounding order (fused multiply-add, reciprocal
of sqrt(bias correction)), a few ulps per step. bf16/fp16: one rounding of the param
per step at the storage precision; the bound is the dtype's epsilon times the
parameter scale, i.e. one to two ulps, and the tests additionally require the error
against a float64 oracle to be at most 2x what torch's own optimizer makes.
"""
import torch

# dtype -> (rtol, atol) for comparing a param after a few steps
TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-14),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}

# fp32 trajectories that amplify rounding (RMSprop centered: v - grad_avg^2 cancels) are
# judged against a float64 run: our largest error per param at most this many times
# torch's own fp32 error (or the fp32 tolerance at the tensor's scale, if larger).
FP32_ORACLE_RATIO = 2.0
# The same for a state that missed torch's beyond the fp32 tolerance: a state fed by the
# cancelling division (centered RMSprop's momentum buffer) carries the amplified
# rounding of every earlier step. Seen on a rare draw of the GradScaler test: the
# pure-torch reference backend (then unfused fp32 ops in another order than torch's)
# beyond twice torch's error, though no less correct. A momentum buffer off by 1e-4
# relative still fails it (test_rmsprop.py::test_grad_scaler_oracle_judge_catches_a_wrong_state).
FP32_ORACLE_STATE_RATIO = 4.0
# Op-level tests (tests/ops) judge such a state with the fp32 row itself, its absolute
# part scaled by the float64 oracle's magnitude of the state's terms (RMSprop's momentum
# buffer: momentum * m + |g / avg|), at least the tensor's largest |value|
# (optim_op_helpers.assert_state_close_normwise): a scalar whose terms of ~10 cancel to
# 0.01 carries fp32 rounding of ~1e-6 in torch's run too.

# the states (exp_avg, exp_avg_sq) stay fp32 in most tests; when they are stored in
# a low-precision dtype they use the same row as the params.


def tol(dtype: torch.dtype) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol}


# --- norms (multi_tensor_norm, clip_grad_norm_, LAMB's trust ratio) ------------------------
# fp32 results against a float64 torch.linalg.vector_norm. The CPU kernel accumulates in
# double and rounds once (~6e-8); Triton and CUDA sum fp32 terms per block / thread, then
# in double (a few fp32 ulps). atol 0: a zero norm must be exactly 0.
NORM_TOL = {"rtol": 2e-6, "atol": 0.0}
# ord other than 2, 1, inf, -inf, 0: Triton takes |x|^p as exp2(p * log2|x|) in fp32.
NORM_TOL_P = {"rtol": 2e-5, "atol": 0.0}

# LAMB (no torch twin) with bf16 / fp16 params, against the float64 oracle: each step
# rounds the param once to nearest (<= 0.5 ulp) and moves it by lr * trust * u with u
# from fp32 (or low-precision) moments; the error may grow by at most this many ulps of
# the storage dtype per step (a missing trust ratio or bias correction is off by many).
LAMB_LOWP_ULPS_PER_STEP = 1.0
# A one-element tensor's LAMB step is lr * |p| * sign(u), a sign update: where u nearly
# cancels (|u| below this fraction of |m_hat / (sqrt(v_hat) + eps)| + |weight_decay * p| at
# some step), the rounding of a bf16 / fp16 param decides the sign, and the float64 oracle
# cannot say what a low-precision run gives; such tensors (a few in 10,000) are left out of
# the low-precision comparison. With low-precision *states* a one-element tensor is left
# out altogether: cancellation inside m (m = b1 m + (1 - b1) g) turns the state's rounding
# (2^-9 relative in bf16) into any relative error of u. Larger tensors are always compared.
LAMB_SIGN_MARGIN = 0.02


# --- low precision judged against the float64 oracle, in ulps of the storage dtype ----
# err(x) = max over elements of |x - oracle| / spacing(dtype, scale), where `scale` bounds
# |param| along the whole trajectory (so errors made at an earlier, larger magnitude are
# not blown up by a later, smaller one). Ours must satisfy
#     err(ours) <= LOWP_ERR_RATIO * max(err(torch), LOWP_ERR_FLOOR_ULPS)
# with torch's own optimizer run at the same precision on the same inputs. A kernel that
# skips the update, flips its sign or loses a bias correction is off by many ulps.
LOWP_ERR_RATIO = 2.0
LOWP_ERR_FLOOR_ULPS = 1.0

# --- stochastic rounding (bf16) ---------------------------------------------------------
# A stochastically rounded value lies within SR_MAX_ULPS bf16 ulps of the fp32 update it
# rounds (plus the fp32 row of TOL for the fp32 update itself).
SR_MAX_ULPS = 1.0
# Unbiasedness: |mean of N roundings - value| <= SR_MEAN_SIGMAS * ulp * sqrt(q(1-q)/N)
# (q = fractional position of the value between its two bf16 neighbours). 6 sigma:
# a correct kernel fails about once in 5e8 runs; round-to-nearest misses by > 100 sigma.
SR_MEAN_SIGMAS = 6.0
# Backends draw the same random bits for (seed, tensor, element); their fp32 updates may
# differ by an fp32 ulp, which moves the rounded bf16 value only when the 16 random bits
# fall at the very edge (about 1 in 65536). Fraction of elements whose bits must agree:
SR_BIT_AGREEMENT = 0.99


def sr_bound(want: torch.Tensor) -> torch.Tensor:
    """How far (elementwise, float64) a stochastically rounded bf16 value may lie from the
    fp32 update `want` it rounds: SR_MAX_ULPS bf16 ulps plus the fp32 row of TOL."""
    rtol, atol = TOL[torch.float32]
    want = want.double()
    return SR_MAX_ULPS * spacing(torch.bfloat16, want) + atol + rtol * want.abs()


def spacing(dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """ulp of `dtype` at magnitude |scale| (elementwise, float64); below the smallest
    normal number, the ulp there."""
    fi = torch.finfo(dtype)
    scale = scale.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(scale))) * fi.eps


def ulp_error(x: torch.Tensor, oracle: torch.Tensor, dtype: torch.dtype,
              scale: torch.Tensor) -> float:
    """max |x - oracle| in ulps of `dtype` at `scale` (0.0 for empty tensors)."""
    if x.numel() == 0:
        return 0.0
    err = (x.double() - oracle.double()).abs() / spacing(dtype, scale)
    return float(err.max())


# --- sign-based updates (Lion) ----------------------------------------------------------
# sign(c) flips under any rounding where |c| is tiny, moving that element by 2 lr. Tests
# with unconstrained grads compare only elements whose float64 |c| stayed above this
# margin at every step (fp32 rounding of c is ~1e-7 for O(1) inputs); at most
# SIGN_EXCLUDED_MAX of the elements may be excluded, so a test cannot pass vacuously.
SIGN_MARGIN = 1e-5
SIGN_EXCLUDED_MAX = 1e-2


# --- training check (tests/optim: a small model on a synthetic task, same data and init)
# ours' final loss vs torch's after the same N fp32 steps: the runs differ only by
# rounding order, so the losses agree to TRAIN_LOSS_RTOL; and the run must have learned
# (final loss at most TRAIN_LOSS_MAX_FRACTION of the target's mean square).
TRAIN_LOSS_RTOL = 1e-3
TRAIN_LOSS_MAX_FRACTION = 0.5
