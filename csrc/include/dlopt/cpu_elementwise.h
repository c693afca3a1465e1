// The CPU frame every element-wise optimizer step shares (Adam, SGD, Adagrad, RMSprop,
// Lion): per-tensor arguments, the chunk loop, and the host half after the checks. An
// optimizer brings only its Op (which state streams it reads and writes, and the
// per-element maths of its *_math.h) and its per-tensor coefficients; the CUDA twin of
// this file is multi_tensor_apply.cuh.
//
// An Op provides:
//   using Coeffs = ...;                  // per tensor (lr, betas, bias corrections, ...)
//   static constexpr unsigned kReads;    // bit k: state stream k is loaded
//   static constexpr unsigned kWrites;   // bit k: state stream k is stored
//   static void update(C& p, C g, C (&s)[kMaxStates], const Coeffs& c);
// with C the arithmetic's type, the param storage's P::C (fp32; double for float64
// params). `g` comes unscaled (divided by the grad scale) and negated for maximize; `p`
// is the value (fp32 master copy or param) and is written back as the store mode says.
#pragma once
#include <ATen/core/Tensor.h>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {

constexpr int kMaxStates = 3;

template <class Coeffs>
struct StepArgs {
  void* p;
  const void* g;
  void* s[kMaxStates];  // state streams (nullptr: unused)
  float* master;
  Coeffs c;
  double grad_mul;  // (maximize ? -1 : 1) / grad_scale, as the arithmetic's type holds it
  uint32_t sr_key;
};

template <class Coeffs>
using StepChunkFn = void (*)(const StepArgs<Coeffs>&, int64_t, int64_t);

// Stream k of a chunk, typed, or nullptr where the Op never touches it (a constant the
// compiler folds, so the unused stream costs neither a load nor a prefetch).
template <class Op, class S, int K>
typename S::T* state_stream(const StepArgs<typename Op::Coeffs>& a, const ChunkLoop& ck) {
  constexpr bool kUsed = ((Op::kReads | Op::kWrites) >> K) & 1u;
  return kUsed ? ck.offset(static_cast<typename S::T*>(a.s[K])) : nullptr;
}

// Elements [lo, hi) of a chunk (all pointers at the chunk's first element; `base` is its
// index in the tensor, the stochastic-rounding counter). Pointer parameters, not an
// array of pointers, whose __restrict__ gcc ignores: the loop vectorizes as written,
// free of runtime alias checks.
template <class Op, class P, class S, Store STORE>
DLOPT_HD void step_elements(int32_t lo, int32_t hi, typename P::T* __restrict__ p,
                            const typename P::T* __restrict__ g, typename S::T* __restrict__ s0,
                            typename S::T* __restrict__ s1, typename S::T* __restrict__ s2,
                            float* __restrict__ master, const typename Op::Coeffs& c,
                            typename P::C grad_mul, uint32_t key, uint32_t base) {
  using C = typename P::C;
  constexpr unsigned R = Op::kReads, W = Op::kWrites;
  for (int32_t i = lo; i < hi; ++i) {
    C pf = load_param<P, STORE>(p, master, i);
    C s[kMaxStates] = {(R & 1u) ? S::load(s0[i]) : C(0), (R & 2u) ? S::load(s1[i]) : C(0),
                       (R & 4u) ? S::load(s2[i]) : C(0)};
    Op::update(pf, P::load(g[i]) * grad_mul, s, c);
    if (W & 1u) s0[i] = S::store(s[0]);
    if (W & 2u) s1[i] = S::store(s[1]);
    if (W & 4u) s2[i] = S::store(s[2]);
    write_param<P, STORE>(p, master, pf, key, i, base);
  }
}

// How many memory streams a chunk of Op walks: param, grad, used states, master.
template <class Op, Store STORE>
constexpr int num_streams() {
  return 2 + __builtin_popcount(Op::kReads | Op::kWrites) + (STORE == Store::kMaster ? 1 : 0);
}

// How a two-stream loop (plain SGD: p -= lr * g) walks a chunk: its two halves side by
// side (four streams in flight) or once, front to back. Paired kernel-level runs: on the
// 2-vCPU Intel Xeon VM CI first ran on, the halves beat one walk with or without
// prefetch (as the norm's single stream gained from the same split,
// multi_tensor_norm.cpp); on the 2-vCPU AMD EPYC (Zen 5) VM since, one plain walk was
// the faster (benchmarks/bench_optim_sgd.py, fp32_10m_plain, with DLOPT_CPU_WALK=halves
// against the default; docs/architecture.md has the numbers). So: the halves
// on Intel CPUs, one walk elsewhere. DLOPT_CPU_WALK=halves|single overrides it (A/B
// timing and tests; read once per process).
inline bool walk_halves() {
  static const bool halves = [] {
    const char* v = std::getenv("DLOPT_CPU_WALK");
    const std::string want = v == nullptr ? "auto" : v;
    TORCH_CHECK_VALUE(want == "auto" || want == "halves" || want == "single",
                      "DLOPT_CPU_WALK must be auto, halves or single, got '", want, "'");
    if (want != "auto") return want == "halves";
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_is("intel") != 0;
#else
    return false;
#endif
  }();
  return halves;
}

// One chunk [begin, end) of one tensor: P param storage, S state storage, STORE how the
// param is written. Loops of three or more streams run in prefetching blocks
// (prefetch_ahead); two-stream loops as walk_halves says.
template <class Op, class P, class S, Store STORE>
void step_chunk(const StepArgs<typename Op::Coeffs>& a, int64_t begin, int64_t end) {
  const ChunkLoop ck(begin, end);  // 32-bit index: see write_param
  auto* p = ck.offset(static_cast<typename P::T*>(a.p));
  const auto* g = ck.offset(static_cast<const typename P::T*>(a.g));
  auto* s0 = state_stream<Op, S, 0>(a, ck);
  auto* s1 = state_stream<Op, S, 1>(a, ck);
  auto* s2 = state_stream<Op, S, 2>(a, ck);
  float* master = ck.offset(a.master);
  const typename Op::Coeffs c = a.c;
  const auto grad_mul = static_cast<typename P::C>(a.grad_mul);
  const uint32_t key = a.sr_key;
  const auto run = [&](int32_t lo, int32_t hi) {
    step_elements<Op, P, S, STORE>(lo, hi, p, g, s0, s1, s2, master, c, grad_mul, key, ck.base);
  };
  if constexpr (num_streams<Op, STORE>() <= 2) {
    // blocks either way: the inner loop's trip count stays small and fixed
    const int32_t half = walk_halves() ? ck.len / (2 * kPrefetchBlock) * kPrefetchBlock : 0;
    for (int32_t lo = 0; lo < half; lo += kPrefetchBlock) {
      run(lo, lo + kPrefetchBlock);
      run(half + lo, half + lo + kPrefetchBlock);
    }
    for (int32_t lo = 2 * half; lo < ck.len; lo += kPrefetchBlock) run(lo, ck.block_end(lo));
  } else {
    for (int32_t lo = 0; lo < ck.len; lo += kPrefetchBlock) {
      prefetch_ahead(lo, p, g, s0, s1, s2, master);
      run(lo, ck.block_end(lo));
    }
  }
}

inline Store store_mode(bool use_master, bool use_sr) {
  return use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
}

inline uint32_t sr_seed_value(const std::optional<at::Tensor>& sr_seed) {
  return sr_seed.has_value() ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;
}

// The host half after an op's checks. `L` holds params, grads, `num_states` state lists
// (an empty one: unused) and the master list, in that order. per_tensor(i, args) fills
// args.c (counting the tensor's step first where the op has steps) and returns the
// chunk function for tensor i; it is called for every tensor, zero-size ones included,
// so their steps are counted as torch counts them. Then one parallel region runs every
// chunk of every tensor, and scratch copies go back into the caller's tensors.
template <class Coeffs, class PerTensor>
void run_step(AlignedLists& L, int num_states, bool use_master, uint32_t seed, double grad_mul,
              const PerTensor& per_tensor) {
  const size_t n = L[0].size();
  std::vector<StepArgs<Coeffs>> args(n);
  std::vector<StepChunkFn<Coeffs>> fns(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    StepArgs<Coeffs>& a = args[i];
    fns[i] = per_tensor(i, a);
    numels[i] = L[0][i].numel();
    if (numels[i] == 0) continue;
    a.p = L[0][i].data_ptr();
    a.g = L[1][i].data_ptr();
    for (int k = 0; k < kMaxStates; ++k) {
      const bool present = k < num_states && !L[2 + k].empty();
      a.s[k] = present ? L[2 + k][i].data_ptr() : nullptr;
    }
    a.master = use_master ? L[2 + num_states][i].data_ptr<float>() : nullptr;
    a.grad_mul = grad_mul;
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
  }
  for_each_chunk(numels, [&](int32_t t, int64_t b, int64_t e) { fns[t](args[t], b, e); });
  L.finish();
}

// run_step in the call's arithmetic: double for a float64 call (float64_call), with
// CoeffsOf<double>; fp32 otherwise. per_tensor is generic over the StepArgs it fills
// (its coefficients' `Compute` type tells which).
template <template <class> class CoeffsOf, class PerTensor>
void run_step_for(bool wide, AlignedLists& L, int num_states, bool use_master, uint32_t seed,
                  double grad_mul, const PerTensor& per_tensor) {
  if (wide) {
    run_step<CoeffsOf<double>>(L, num_states, false, 0, grad_mul, per_tensor);
  } else {
    // the fp32 multiplier, rounded once as the fp32 kernels (and the CUDA ones) use it
    run_step<CoeffsOf<float>>(L, num_states, use_master, seed, static_cast<float>(grad_mul),
                              per_tensor);
  }
}

}  // namespace dlopt
