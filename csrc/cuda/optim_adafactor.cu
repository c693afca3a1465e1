// Multi-tensor Adafactor step on CUDA, kernels and launcher (nvcc); the checks, the
// row-major stand-ins and the registered op are in optim_adafactor_host.cpp (g++).
// Same semantics and passes as csrc/cpu/optim_adafactor.cpp, the maths in
// dlopt/adafactor_math.h.
//
// Everything runs on the current stream without host syncs (capturable): lr,
// grad_scale, found_inf and sr_seed are read by the kernels (or by the host half when
// they are CPU tensors), steps are counted on the device. Launches:
//   prepare    one thread per tensor: step += 1 (unless found_inf), per-tensor
//              coefficients (adafactor_coeffs, grad multiplier, SR key) to scratch;
// then, per (param dtype, state dtype) group, each a series of launches whose work
// items (one block each) travel in the kernel argument (AfTable, < 4 KB):
//   stats      rows of a factored matrix: each row's sum of g^2 (a warp per row),
//              each column's partial sum (fp64 atomics), sum(p^2) (fp64 atomic);
//              vector chunks: sum(p^2);
//   factors    one block per matrix: row / column factors lerp towards their means,
//              den = max(mean(row factor), eps1);
//   direction  sum(u^2) per tensor (fp64 atomics); vectors update their variance;
//   apply      p = p * (1 - lr wd) - alpha / max(1, rms(u) / d) * u.
// Factored tensors are walked as row-major [batch, rows, cols].
//
// The kernel bodies are __host__ __device__ (af_stats etc., each behind a thin
// __global__ af_kernel) and take their indices and cross-thread operations from
// dlopt/cuda_threads.cuh, so that under DLOPT_EMULATE (tests/cuda_emulation) the
// launcher runs them on the CPU unchanged.
#include <algorithm>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "dlopt/adafactor_math.h"
#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_scalar.cuh"
#include "dlopt/cuda_steps.cuh"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/cuda_threads.cuh"
#include "dlopt/rounding.h"

namespace dlopt {
namespace {

using cuda::ScalarRef;

constexpr int kThreads = 256;
constexpr int64_t kPartElems = 16384;  // elements per block
constexpr int kParts = 8;              // blocks per work item (gridDim.y)
constexpr int64_t kItemElems = kParts * kPartElems;

// Per-tensor values written by the prepare kernel.
struct AfTensorCoeffs {
  AdafactorCoeffs c;
  float grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
};

// What a store adapter (cuda_storage.cuh) needs from the calling block.
struct StoreCtx {
  uint32_t sr_key;
};

// ---- prepare ------------------------------------------------------------------------

struct AfHyper {
  ScalarRef lr, grad_scale, found_inf, seed;
  double beta2_decay, weight_decay;
  bool maximize;
};
static_assert(sizeof(cuda::StepBatch) + sizeof(AfHyper) + sizeof(void*) <= 4096,
              "af_prepare_kernel arguments over 4 KB");

// Thread k of the batch (host-callable, as Adam's adam_prepare_one).
DLOPT_HD void af_prepare_one(const cuda::StepBatch& b, const AfHyper& h, AfTensorCoeffs* out,
                             int k) {
  if (k >= b.count || cuda::skip_step(h.found_inf)) return;
  const double step = cuda::bump_step(b, k);
  const int32_t i = b.first + k;
  AfTensorCoeffs r;
  r.c = adafactor_coeffs(cuda::load_f64(h.lr), step, h.beta2_decay, h.weight_decay);
  r.grad_mul = static_cast<float>((h.maximize ? -1.0 : 1.0) / cuda::load_f64(h.grad_scale));
  r.sr_key = sr_tensor_key(static_cast<uint32_t>(cuda::load_i64(h.seed)), static_cast<uint32_t>(i));
  out[i] = r;
}

__global__ void af_prepare_kernel(const __grid_constant__ cuda::StepBatch b,
                                  const __grid_constant__ AfHyper h, AfTensorCoeffs* out) {
  af_prepare_one(b, h, out, blockIdx.x * blockDim.x + threadIdx.x);
}

// ---- work tables ----------------------------------------------------------------------

struct AfDesc {  // one tensor of a launch table
  void* p;
  const void* g;
  float* master;
  void* var;  // 0-/1-D: variance
  void* rv;   // factored: row / column factors (state storage)
  void* cv;
  int64_t numel, rows, cols;
  int64_t row_off, col_off, den_off;  // into the row_sum / col_sum / den scratch
  int32_t index;                      // into coeffs and sums
  int32_t factored;
};

// stats / direction / apply: rows [begin, begin + count) of the flattened (batch x
// rows) of a factored tensor, never across a matrix, or elements of a vector;
// factors: begin is the matrix (batch index), count 1.
struct AfItem {
  int64_t begin;
  int32_t count;
  int32_t slot;
};

struct AfShared {
  ScalarRef found_inf;
  const AfTensorCoeffs* coeffs;
  double* sums;  // [2 n]: sum(p^2), then sum(u^2)
  double* row_sum;
  double* col_sum;
  float* den;
  float eps1, eps1_sq;
  double eps2, d;
  int32_t n;
};

constexpr int kDescs = 14;
constexpr int kItems = 120;

struct AfTable {
  AfShared s;
  AfDesc t[kDescs];
  AfItem it[kItems];
};
static_assert(sizeof(AfTable) <= 4000, "AfTable kernel argument over 4 KB");

// Packs (desc, items) into tables of kDescs tensors and kItems items; fn(table, items)
// -> cudaError_t, stopping at the first error. A tensor whose items straddle two tables
// is added to the next one again.
template <class Fn>
cudaError_t for_each_table(const AfShared& s, const std::vector<AfDesc>& descs,
                           const std::vector<std::vector<AfItem>>& items, Fn&& fn) {
  AfTable tab;
  tab.s = s;
  int nt = 0, ni = 0;
  for (size_t d = 0; d < descs.size(); ++d) {
    if (items[d].empty()) continue;
    if (nt == kDescs) {
      DLOPT_CUDA_TRY(fn(static_cast<const AfTable&>(tab), ni));
      nt = ni = 0;
    }
    tab.t[nt++] = descs[d];
    for (const AfItem& item : items[d]) {
      if (ni == kItems) {
        DLOPT_CUDA_TRY(fn(static_cast<const AfTable&>(tab), ni));
        ni = 0;
        tab.t[0] = descs[d];
        nt = 1;
      }
      tab.it[ni] = item;
      tab.it[ni].slot = nt - 1;
      ++ni;
    }
  }
  return ni > 0 ? fn(static_cast<const AfTable&>(tab), ni) : cudaSuccess;
}

// The part of an item this block handles: an item is split into gridDim.y parts (rows
// of a factored item, elements of a vector), so that one launch of kItems items gives
// the GPU kItems * kParts blocks.
DLOPT_HD AfItem my_part(const AfItem& it) {
  const int32_t parts = static_cast<int32_t>(cuda::grid_y());
  const int32_t per = (it.count + parts - 1) / parts;
  const int32_t lo = std::min(it.count, per * static_cast<int32_t>(cuda::block_y()));
  const int32_t hi = std::min(it.count, lo + per);
  return AfItem{it.begin + lo, hi - lo, it.slot};
}

// ---- reductions -------------------------------------------------------------------------

DLOPT_HD double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += cuda::shfl_down(x, o);
  return x;
}

// The block's sum, valid in thread 0.
DLOPT_HD double block_sum(double x) {
#ifdef __CUDA_ARCH__
  __shared__ double part[kThreads / 32];
#else
  static double part[kThreads / 32];  // the emulation's threads (cuda_threads.cuh)
#endif
  x = warp_sum(x);
  const unsigned tid = cuda::thread_x(), lane = tid % 32, warp = tid / 32;
  if (lane == 0) part[warp] = x;
  cuda::sync_block();
  x = tid < kThreads / 32 ? part[tid] : 0.0;
  if (warp == 0) x = warp_sum(x);
  cuda::sync_block();  // part may be reused by a later call
  return x;
}

// ---- kernels --------------------------------------------------------------------------

template <class PS, bool MASTER>
DLOPT_HD float load_p(const AfDesc& t, int64_t i) {
  if (MASTER) return t.master[i];
  return PS::load(static_cast<const typename PS::T*>(t.p)[i]);
}

template <class PS>
DLOPT_HD float load_g(const AfDesc& t, int64_t i, float mul) {
  return PS::load(static_cast<const typename PS::T*>(t.g)[i]) * mul;
}

// One thread's part of each pass (af_kernel launches them).
template <class PS, class S, bool MASTER>
DLOPT_HD void af_stats(const AfTable& tab) {
  const AfShared& s = tab.s;
  if (cuda::skip_step(s.found_inf)) return;
  const AfItem it = my_part(tab.it[cuda::block_x()]);
  if (it.count <= 0) return;
  const AfDesc& t = tab.t[it.slot];
  const float mul = s.coeffs[t.index].grad_mul;
  double ps = 0.0;
  if (t.factored) {
    const int lane = cuda::thread_x() % 32, warp = cuda::thread_x() / 32;
    for (int r = warp; r < it.count; r += kThreads / 32) {
      const int64_t row = it.begin + r;
      double rs = 0.0;
      for (int64_t c = lane; c < t.cols; c += 32) {
        const double g = load_g<PS>(t, row * t.cols + c, mul);
        const double p = load_p<PS, MASTER>(t, row * t.cols + c);
        rs += g * g;
        ps += p * p;
      }
      rs = warp_sum(rs);
      if (lane == 0) s.row_sum[t.row_off + row] = rs;
    }
    const int64_t b = it.begin / t.rows;  // an item's rows share one matrix
    for (int64_t c = cuda::thread_x(); c < t.cols; c += kThreads) {
      double cs = 0.0;
      for (int r = 0; r < it.count; ++r) {
        const double g = load_g<PS>(t, (it.begin + r) * t.cols + c, mul);
        cs += g * g;
      }
      cuda::atomic_add(s.col_sum + t.col_off + b * t.cols + c, cs);
    }
  } else {
    for (int64_t i = it.begin + cuda::thread_x(); i < it.begin + it.count; i += kThreads) {
      const double p = load_p<PS, MASTER>(t, i);
      ps += p * p;
    }
  }
  ps = block_sum(ps);
  if (cuda::thread_x() == 0) cuda::atomic_add(s.sums + t.index, ps);
}

template <class PS, class S, bool MASTER>
DLOPT_HD void af_factors(const AfTable& tab) {
  const AfShared& s = tab.s;
  if (cuda::skip_step(s.found_inf)) return;
  const AfItem& it = tab.it[cuda::block_x()];
  const AfDesc& t = tab.t[it.slot];
  const float w = s.coeffs[t.index].c.one_minus_beta2;
  const int64_t b = it.begin;
  auto* rv = static_cast<typename S::T*>(t.rv);
  auto* cv = static_cast<typename S::T*>(t.cv);
  const StoreCtx ctx{0u};
  double rsum = 0.0;
  for (int64_t r = cuda::thread_x(); r < t.rows; r += kThreads) {
    const int64_t j = b * t.rows + r;
    const float mean = static_cast<float>(s.row_sum[t.row_off + j] / t.cols);
    const typename S::T v = S::store(lerp_torch(S::load(rv[j]), mean, w), ctx, j);
    rv[j] = v;
    rsum += S::load(v);  // as stored: what the later kernels read
  }
  rsum = block_sum(rsum);
  if (cuda::thread_x() == 0)
    s.den[t.den_off + b] = clamp_min_nan(static_cast<float>(rsum / t.rows), s.eps1);
  for (int64_t c = cuda::thread_x(); c < t.cols; c += kThreads) {
    const int64_t j = b * t.cols + c;
    const float mean = static_cast<float>(s.col_sum[t.col_off + j] / t.rows);
    cv[j] = S::store(lerp_torch(S::load(cv[j]), mean, w), ctx, j);
  }
}

// The update direction of element e of a factored item (row it.begin + e / cols).
template <class PS, class S>
DLOPT_HD float factored_u(const AfShared& s, const AfDesc& t, int64_t row,
                                            int64_t c, float den, float mul) {
  const int64_t b = row / t.rows;
  const float rv = S::load(static_cast<const typename S::T*>(t.rv)[row]);
  const float cv = S::load(static_cast<const typename S::T*>(t.cv)[b * t.cols + c]);
  return adafactor_direction(load_g<PS>(t, row * t.cols + c, mul),
                             factored_variance(rv, cv, den), s.eps1_sq);
}

template <class PS, class S, bool MASTER>
DLOPT_HD void af_direction(const AfTable& tab) {
  const AfShared& s = tab.s;
  if (cuda::skip_step(s.found_inf)) return;
  const AfItem it = my_part(tab.it[cuda::block_x()]);
  if (it.count <= 0) return;
  const AfDesc& t = tab.t[it.slot];
  const AfTensorCoeffs& k = s.coeffs[t.index];
  double us = 0.0;
  if (t.factored) {
    const float den = s.den[t.den_off + it.begin / t.rows];
    const int64_t count = static_cast<int64_t>(it.count) * t.cols;
    for (int64_t e = cuda::thread_x(); e < count; e += kThreads) {
      const float u = factored_u<PS, S>(s, t, it.begin + e / t.cols, e % t.cols, den, k.grad_mul);
      us += static_cast<double>(u) * u;
    }
  } else {
    auto* var = static_cast<typename S::T*>(t.var);
    const StoreCtx ctx{0u};
    for (int64_t i = it.begin + cuda::thread_x(); i < it.begin + it.count; i += kThreads) {
      const float g = load_g<PS>(t, i, k.grad_mul);
      const typename S::T v = S::store(lerp_torch(S::load(var[i]), g * g, k.c.one_minus_beta2),
                                       ctx, i);
      var[i] = v;
      const float u = adafactor_direction(g, S::load(v), s.eps1_sq);
      us += static_cast<double>(u) * u;
    }
  }
  us = block_sum(us);
  if (cuda::thread_x() == 0) cuda::atomic_add(s.sums + s.n + t.index, us);
}

template <class PS, class S, bool MASTER, bool WD>
DLOPT_HD void af_apply(const AfTable& tab) {
  const AfShared& s = tab.s;
  if (cuda::skip_step(s.found_inf)) return;
  const AfItem it = my_part(tab.it[cuda::block_x()]);
  if (it.count <= 0) return;
  const AfDesc& t = tab.t[it.slot];
  const AfTensorCoeffs& k = s.coeffs[t.index];
  const float step = static_cast<float>(adafactor_step_size(
      s.sums[t.index], s.sums[s.n + t.index], static_cast<double>(t.numel), s.eps2, k.c.rho, s.d));
  const StoreCtx ctx{k.sr_key};
  auto* p = static_cast<typename PS::T*>(t.p);
  auto update = [&](int64_t i, float u) {
    const float x = adafactor_apply<WD>(load_p<PS, MASTER>(t, i), u, k.c.decay_factor, step);
    if (MASTER) t.master[i] = x;
    p[i] = PS::store(x, ctx, i);
  };
  if (t.factored) {
    const float den = s.den[t.den_off + it.begin / t.rows];
    const int64_t count = static_cast<int64_t>(it.count) * t.cols;
    for (int64_t e = cuda::thread_x(); e < count; e += kThreads) {
      const int64_t row = it.begin + e / t.cols, c = e % t.cols;
      update(row * t.cols + c, factored_u<PS, S>(s, t, row, c, den, k.grad_mul));
    }
  } else {
    const auto* var = static_cast<const typename S::T*>(t.var);
    for (int64_t i = it.begin + cuda::thread_x(); i < it.begin + it.count; i += kThreads)
      update(i, adafactor_direction(load_g<PS>(t, i, k.grad_mul), S::load(var[i]), s.eps1_sq));
  }
}

// The passes as types, for af_kernel and for the emulation's launches.
template <class PS, class S, bool MASTER>
struct AfStats {
  static DLOPT_HD void run(const AfTable& tab) { af_stats<PS, S, MASTER>(tab); }
};
template <class PS, class S, bool MASTER>
struct AfFactors {
  static DLOPT_HD void run(const AfTable& tab) { af_factors<PS, S, MASTER>(tab); }
};
template <class PS, class S, bool MASTER>
struct AfDirection {
  static DLOPT_HD void run(const AfTable& tab) { af_direction<PS, S, MASTER>(tab); }
};
template <class PS, class S, bool MASTER, bool WD>
struct AfApply {
  static DLOPT_HD void run(const AfTable& tab) { af_apply<PS, S, MASTER, WD>(tab); }
};

template <class Pass>
__global__ void __launch_bounds__(kThreads) af_kernel(const __grid_constant__ AfTable tab) {
  Pass::run(tab);
}

// ---- launching ----------------------------------------------------------------------

struct AfGroup {
  std::vector<AfDesc> descs;
  std::vector<std::vector<AfItem>> items;    // stats / direction / apply
  std::vector<std::vector<AfItem>> matrices; // factors
};

template <class PS, class S, bool MASTER>
struct PickAdafactor {
  template <bool WD>
  static cudaError_t run(const AfShared& s, const AfGroup& g, cudaStream_t stream) {
    auto launch = [&](auto pass, const std::vector<std::vector<AfItem>>& items, int parts) {
      using Pass = decltype(pass);
      return for_each_table(s, g.descs, items, [&](const AfTable& tab, int blocks) {
#ifdef DLOPT_EMULATE
        cuda::emulated_launch(blocks, parts, kThreads, [&] { Pass::run(tab); });
        return cudaSuccess;
#else
        af_kernel<Pass><<<dim3(blocks, parts), kThreads, 0, stream>>>(tab);
        return cudaGetLastError();
#endif
      });
    };
    DLOPT_CUDA_TRY(launch(AfStats<PS, S, MASTER>{}, g.items, kParts));
    DLOPT_CUDA_TRY(launch(AfFactors<PS, S, MASTER>{}, g.matrices, 1));
    DLOPT_CUDA_TRY(launch(AfDirection<PS, S, MASTER>{}, g.items, kParts));
    return launch(AfApply<PS, S, MASTER, WD>{}, g.items, kParts);
  }
  static cudaError_t run(bool wd, const AfShared& s, const AfGroup& g, cudaStream_t stream) {
    return wd ? run<true>(s, g, stream) : run<false>(s, g, stream);
  }
};

}  // namespace

namespace cuda {

cudaError_t launch_adafactor_step(const Launch& l, double beta2_decay, double eps1, double eps2,
                                  double d, double weight_decay, bool maximize) {
  const AfHyper h{l.lr, l.grad_scale, l.found_inf, l.seed, beta2_decay, weight_decay, maximize};
  auto* coeffs = static_cast<AfTensorCoeffs*>(l.scratch.get(l.n * sizeof(AfTensorCoeffs)));
  if (coeffs == nullptr) return cudaErrorMemoryAllocation;
  DLOPT_CUDA_TRY(for_each_step_batch(l, [&](const StepBatch& b) {
#ifdef DLOPT_EMULATE  // a host-only build: the threads in a loop
    for (int k = 0; k < b.count; ++k) af_prepare_one(b, h, coeffs, k);
    return cudaSuccess;
#else
    af_prepare_kernel<<<(b.count + 127) / 128, 128, 0, l.stream>>>(b, h, coeffs);
    return cudaGetLastError();
#endif
  }));

  // Work items and scratch offsets, grouped by storage.
  std::map<std::pair<DType, DType>, AfGroup> groups;
  int64_t rows_total = 0, cols_total = 0, dens_total = 0;
  for (int32_t i = 0; i < l.n; ++i) {
    const ParamEntry& e = l.entries[i];
    if (e.numel == 0) continue;  // its step was counted; nothing else (torch divides by zero)
    AfDesc t{};
    t.p = e.ptr[0];
    t.g = e.ptr[1];
    t.rv = e.ptr[2];
    t.cv = e.ptr[3];
    t.var = e.ptr[4];
    t.master = static_cast<float*>(e.ptr[5]);
    t.numel = e.numel;
    t.index = e.index;
    t.factored = e.cols != 0;
    std::vector<AfItem> items, matrices;
    if (t.factored) {
      t.rows = e.rows;
      t.cols = e.cols;
      const int64_t batch = e.numel / (t.rows * t.cols);
      t.row_off = rows_total;
      t.col_off = cols_total;
      t.den_off = dens_total;
      rows_total += batch * t.rows;
      cols_total += batch * t.cols;
      dens_total += batch;
      const int64_t per = std::max<int64_t>(1, std::min<int64_t>(kItemElems / t.cols, 1 << 30));
      for (int64_t b = 0; b < batch; ++b) {
        matrices.push_back({b, 1, 0});
        for (int64_t r = 0; r < t.rows; r += per)
          items.push_back({b * t.rows + r, static_cast<int32_t>(std::min(per, t.rows - r)), 0});
      }
    } else {
      for (int64_t b = 0; b < e.numel; b += kItemElems)
        items.push_back({b, static_cast<int32_t>(std::min(kItemElems, e.numel - b)), 0});
    }
    AfGroup& grp = groups[{e.param, e.state}];
    grp.descs.push_back(t);
    grp.items.push_back(std::move(items));
    grp.matrices.push_back(std::move(matrices));
  }

  // Per-tensor sums, then per-row, per-column and per-matrix scratch.
  auto scratch = [&](int64_t count, size_t size) {
    return l.scratch.get(std::max<int64_t>(1, count) * size);
  };
  AfShared s;
  s.found_inf = h.found_inf;
  s.coeffs = coeffs;
  s.sums = static_cast<double*>(scratch(2 * l.n, sizeof(double)));
  s.row_sum = static_cast<double*>(scratch(rows_total, sizeof(double)));
  s.col_sum = static_cast<double*>(scratch(cols_total, sizeof(double)));
  s.den = static_cast<float*>(scratch(dens_total, sizeof(float)));
  if (!s.sums || !s.row_sum || !s.col_sum || !s.den) return cudaErrorMemoryAllocation;
  // The stats and direction kernels add into these.
#ifdef DLOPT_EMULATE
  std::memset(s.sums, 0, 2 * l.n * sizeof(double));
  std::memset(s.col_sum, 0, cols_total * sizeof(double));
#else
  DLOPT_CUDA_TRY(cudaMemsetAsync(s.sums, 0, 2 * l.n * sizeof(double), l.stream));
  DLOPT_CUDA_TRY(cudaMemsetAsync(s.col_sum, 0, cols_total * sizeof(double), l.stream));
#endif
  s.eps1 = static_cast<float>(eps1);
  s.eps1_sq = static_cast<float>(eps1 * eps1);
  s.eps2 = eps2;
  s.d = d;
  s.n = l.n;
  for (const auto& [key, grp] : groups)
    DLOPT_CUDA_TRY(pick_storage<PickAdafactor>(key.first, key.second, l.store,
                                               weight_decay != 0.0, s, grp, l.stream));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace dlopt
