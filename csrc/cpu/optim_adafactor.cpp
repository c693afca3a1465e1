// Multi-tensor Adafactor step on the CPU (torch.optim.Adafactor's maths, in
// dlopt/adafactor_math.h). One op call for the whole list, three parallel passes over
// the work items of every tensor (items: blocks of whole rows of a factored tensor,
// 32K-element chunks of a vector), with tiny serial steps between them:
//
//   A. sums of squares: each row's sum of g^2 (written per row), each column's (into a
//      per-thread column buffer), and sum(p^2) per tensor (per thread);
//   .  the row / column factors move (lerp) towards their new means; den = max(mean of
//      the row factor, eps1) per matrix;
//   B. sum(u^2) per tensor, u = g / sqrt(max(v, eps1^2)); 0-/1-D tensors also update
//      their variance here;
//   .  step size alpha / max(1, rms(u) / d) per tensor;
//   C. p = p * (1 - lr wd) - step_size * u (u recomputed, not stored).
//
// Factored tensors (>= 2-D) are walked as row-major [batch, rows, cols] (contiguous
// copies for any other layout); the states may be fp32 or the param dtype. The
// arithmetic is fp32, or double for a float64 call (float64 params and states only:
// Passes' C, update_factors<double>).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "dlopt/adafactor_math.h"
#include "dlopt/cpu_multi_tensor.h"
#include "dlopt/cpu_storage.h"
#include "dlopt/rounding.h"
#include "dlopt/tensor_lists.h"

namespace dlopt {
namespace {

struct AfTensor {
  void* p;
  const void* g;
  float* master;
  void* var;      // 0-/1-D: the variance, shaped like the param
  int64_t numel;
  int64_t rows;   // factored: rows (dim -2) and cols (dim -1); the rest is a batch
  int64_t cols;
  int64_t row_off;  // factored: offset of this tensor's (batch x rows) in the row arrays,
  int64_t col_off;  // of its (batch x cols) in the column arrays,
  int64_t den_off;  // of its batch in the den array
  bool factored;
  // Per-tensor values in double, each rounded once to the arithmetic's type C (fp32;
  // double for float64 params) where a pass reads it.
  double one_minus_beta2;  // the lerp weight (adafactor_coeffs)
  double decay_factor;     // 1 - lr * weight_decay
  double rho;
  double grad_mul;  // (maximize ? -1 : 1) / grad_scale
  uint32_t sr_key;
  double step_size;
};

// What the passes share: per-row / per-column work arrays and per-thread accumulators.
struct AfWork {
  double eps1_sq;
  std::vector<double> row_sum;   // sum over cols of g^2, per (tensor, batch, row)
  std::vector<double> col_sum;   // [thread][sum over rows of g^2 per (tensor, batch, col)]
  // The updated factors as stored, in the arithmetic's type C (float32 of an fp32 call,
  // double of a float64 one: factors<C>()).
  template <class C>
  struct Factors {
    std::vector<C> row_var;  // per (tensor, batch, row)
    std::vector<C> col_var;  // per (tensor, batch, col)
    std::vector<C> den;      // max(mean(row factor), eps1) per (tensor, batch)
  };
  Factors<float> f32;
  Factors<double> f64;
  template <class C>
  Factors<C>& factors() {
    if constexpr (std::is_same_v<C, double>) return f64;
    else return f32;
  }
  template <class C>
  const Factors<C>& factors() const {
    return const_cast<AfWork*>(this)->factors<C>();
  }
  std::vector<double> sum_p2;    // [thread][tensor]
  std::vector<double> sum_u2;    // [thread][tensor]
  int64_t total_cols = 0;
  int64_t n = 0;
};

// A work item: rows [begin, end) of the flattened (batch x rows) of a factored tensor,
// or elements [begin, end) of a vector.
struct Item {
  int32_t t;
  int64_t begin, end;
};

using PassFn = void (*)(const AfTensor&, AfWork&, int64_t, int64_t, int, int);

template <class P, class S, Store STORE, bool WD>
struct Passes {
  using PT = typename P::T;
  using ST = typename S::T;
  using C = typename P::C;  // the arithmetic's type

  // A: sums of squares.
  static void a(const AfTensor& a, AfWork& w, int64_t begin, int64_t end, int thread, int t) {
    const auto* __restrict__ p = static_cast<const PT*>(a.p);
    const auto* __restrict__ g = static_cast<const PT*>(a.g);
    const float* __restrict__ master = a.master;
    const C mul = static_cast<C>(a.grad_mul);
    double ps = 0.0;
    if (a.factored) {
      double* __restrict__ col_base = w.col_sum.data() + thread * w.total_cols + a.col_off;
      for (int64_t gr = begin; gr < end; ++gr) {
        const int64_t b = gr / a.rows;
        double* __restrict__ col = col_base + b * a.cols;
        const int64_t off = gr * a.cols;
        double rs = 0.0, rp = 0.0;
#pragma omp simd reduction(+ : rs, rp)
        for (int64_t c = 0; c < a.cols; ++c) {
          const double gf = P::load(g[off + c]) * mul;
          const double pf = load_param<P, STORE>(p, master, off + c);
          rs += gf * gf;
          col[c] += gf * gf;
          rp += pf * pf;
        }
        w.row_sum[a.row_off + gr] = rs;
        ps += rp;
      }
    } else {
#pragma omp simd reduction(+ : ps)
      for (int64_t i = begin; i < end; ++i) {
        const double pf = load_param<P, STORE>(p, master, i);
        ps += pf * pf;
      }
    }
    w.sum_p2[thread * w.n + t] += ps;
  }

  // B: sum(u^2); 0-/1-D tensors update their variance.
  static void b(const AfTensor& a, AfWork& w, int64_t begin, int64_t end, int thread, int t) {
    const auto* __restrict__ g = static_cast<const PT*>(a.g);
    const C mul = static_cast<C>(a.grad_mul);
    const C eps1_sq = static_cast<C>(w.eps1_sq);
    const auto& f = w.template factors<C>();
    double us = 0.0;
    if (a.factored) {
      for (int64_t gr = begin; gr < end; ++gr) {
        const int64_t b = gr / a.rows;
        const C rv = f.row_var[a.row_off + gr];
        const C den = f.den[a.den_off + b];
        const C* __restrict__ cv = f.col_var.data() + a.col_off + b * a.cols;
        const int64_t off = gr * a.cols;
        double rs = 0.0;
#pragma omp simd reduction(+ : rs)
        for (int64_t c = 0; c < a.cols; ++c) {
          const C u = adafactor_direction(P::load(g[off + c]) * mul,
                                          factored_variance(rv, cv[c], den), eps1_sq);
          rs += static_cast<double>(u) * u;
        }
        us += rs;
      }
    } else {
      auto* __restrict__ var = static_cast<ST*>(a.var);
      const C wt = static_cast<C>(a.one_minus_beta2);
#pragma omp simd reduction(+ : us)
      for (int64_t i = begin; i < end; ++i) {
        const C gf = P::load(g[i]) * mul;
        const ST stored = S::store(lerp_torch(static_cast<C>(S::load(var[i])), gf * gf, wt));
        var[i] = stored;
        const C u = adafactor_direction(gf, static_cast<C>(S::load(stored)), eps1_sq);
        us += static_cast<double>(u) * u;
      }
    }
    w.sum_u2[thread * w.n + t] += us;
  }

  // C: the param update.
  static void c(const AfTensor& a, AfWork& w, int64_t begin, int64_t end, int, int) {
    auto* __restrict__ p = static_cast<PT*>(a.p);
    const auto* __restrict__ g = static_cast<const PT*>(a.g);
    float* __restrict__ master = a.master;
    const C mul = static_cast<C>(a.grad_mul);
    const C eps1_sq = static_cast<C>(w.eps1_sq);
    const C decay = static_cast<C>(a.decay_factor);
    const C step = static_cast<C>(a.step_size);
    const uint32_t key = a.sr_key;
    const auto& f = w.template factors<C>();
    if (a.factored) {
      for (int64_t gr = begin; gr < end; ++gr) {
        const int64_t b = gr / a.rows;
        const C rv = f.row_var[a.row_off + gr];
        const C den = f.den[a.den_off + b];
        const C* __restrict__ cv = f.col_var.data() + a.col_off + b * a.cols;
        const int64_t off = gr * a.cols;
        for (int64_t c = 0; c < a.cols; ++c) {
          const int64_t i = off + c;
          const C u = adafactor_direction(P::load(g[i]) * mul,
                                          factored_variance(rv, cv[c], den), eps1_sq);
          write_param<P, STORE>(p, master,
                                adafactor_apply<WD>(load_param<P, STORE>(p, master, i), u,
                                                    decay, step),
                                key, i);
        }
      }
    } else {
      const auto* __restrict__ var = static_cast<const ST*>(a.var);
      for (int64_t i = begin; i < end; ++i) {
        const C u = adafactor_direction(P::load(g[i]) * mul, static_cast<C>(S::load(var[i])),
                                        eps1_sq);
        write_param<P, STORE>(
            p, master, adafactor_apply<WD>(load_param<P, STORE>(p, master, i), u, decay, step),
            key, i);
      }
    }
  }
};

struct PassFns {
  PassFn a, b, c;
};

template <class P, class S, Store STORE>
struct PickAdafactor {
  static PassFns get(bool wd) {
    if (wd) return {&Passes<P, S, STORE, true>::a, &Passes<P, S, STORE, true>::b,
                    &Passes<P, S, STORE, true>::c};
    return {&Passes<P, S, STORE, false>::a, &Passes<P, S, STORE, false>::b,
            &Passes<P, S, STORE, false>::c};
  }
};

// A factor element as double (exact for every state dtype) / stored back at the
// state's dtype from the arithmetic's type C, returning the value as stored, which is
// what the later passes must use. (C is double only for float64 states.)
inline double load_state(at::ScalarType st, const void* base, int64_t i) {
  switch (st) {
    case at::kDouble: return static_cast<const double*>(base)[i];
    case at::kFloat: return static_cast<const float*>(base)[i];
    case at::kBFloat16: return BF16::load(static_cast<const uint16_t*>(base)[i]);
    default: return F16::load(static_cast<const uint16_t*>(base)[i]);
  }
}

template <class C>
inline double store_state(at::ScalarType st, void* base, int64_t i, C x) {
  switch (st) {
    case at::kDouble: return static_cast<double*>(base)[i] = x;
    case at::kFloat: return static_cast<float*>(base)[i] = static_cast<float>(x);
    case at::kBFloat16: {
      const uint16_t v = BF16::store(static_cast<float>(x));
      static_cast<uint16_t*>(base)[i] = v;
      return BF16::load(v);
    }
    default: {
      const uint16_t v = F16::store(static_cast<float>(x));
      static_cast<uint16_t*>(base)[i] = v;
      return F16::load(v);
    }
  }
}

// The factors of factored tensor `a` move towards the new means of g^2 (as stored,
// rounded to their dtype), in the arithmetic's type C; den = max(mean(row factor), eps1)
// per matrix of its batch. Serial: a few elements per row and column, and one parallel
// region less (a region costs a scheduling round trip of every thread).
template <class C>
void update_factors(const AfTensor& a, AfWork& w, void* rv, void* cv, at::ScalarType st,
                    double eps1, int threads) {
  auto& f = w.factors<C>();
  const C wt = static_cast<C>(a.one_minus_beta2);
  const int64_t batch = a.numel / (a.rows * a.cols);
  for (int64_t b = 0; b < batch; ++b) {
    double rsum = 0.0;
    for (int64_t r = 0; r < a.rows; ++r) {
      const int64_t j = b * a.rows + r;
      const C mean = static_cast<C>(w.row_sum[a.row_off + j] / a.cols);
      const double v =
          store_state(st, rv, j, lerp_torch(static_cast<C>(load_state(st, rv, j)), mean, wt));
      f.row_var[a.row_off + j] = static_cast<C>(v);  // exact: v is stored at C or narrower
      rsum += v;
    }
    f.den[a.den_off + b] = clamp_min_nan(static_cast<C>(rsum / a.rows), static_cast<C>(eps1));
    for (int64_t c = 0; c < a.cols; ++c) {
      const int64_t j = b * a.cols + c;
      double sum = 0.0;
      for (int th = 0; th < threads; ++th) sum += w.col_sum[th * w.total_cols + a.col_off + j];
      const C mean = static_cast<C>(sum / a.rows);
      f.col_var[a.col_off + j] = static_cast<C>(
          store_state(st, cv, j, lerp_torch(static_cast<C>(load_state(st, cv, j)), mean, wt)));
    }
  }
}

void adafactor_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList row_vars,
                        at::TensorList col_vars, at::TensorList variances,
                        at::TensorList master_params, at::TensorList state_steps,
                        const at::Tensor& lr, double beta2_decay, double eps1, double eps2,
                        double d, double weight_decay, bool maximize,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& sr_seed) {
  const size_t n = params.size();
  const at::TensorList P = params;
  const bool use_master = !master_params.empty();
  const bool use_sr = sr_seed.has_value();
  check_factored_lists(P, grads, row_vars, col_vars, variances, master_params, state_steps,
                       use_sr);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i].device().is_cpu(), "dlopt::adafactor_step (cpu): params[", i, "] is on ",
                P[i].device());
    check_step_tensor(state_steps[i], i);
  }
  if (n == 0) return;
  if (skip_step(found_inf)) return;  // GradScaler overflow: nothing changes, steps included
  // A float64 call (float64 params only, computed in double): float64 factors and
  // variances, no master copy.
  const bool wide = float64_call(P, {}, use_master);
  for (at::TensorList list : {row_vars, col_vars, variances})
    for (size_t k = 0; k < list.size(); ++k)
      TORCH_CHECK_TYPE(!wide || list[k].scalar_type() == at::kDouble,
                       "dlopt: the states of float64 params must be float64, got ",
                       list[k].scalar_type());

  const Store store = use_master ? Store::kMaster : (use_sr ? Store::kStochastic : Store::kNearest);
  const double lr_v = scalar_value(lr, "lr");
  const double grad_mul = grad_multiplier(maximize, grad_scale);
  const uint32_t seed = use_sr ? static_cast<uint32_t>(sr_seed->item<int64_t>()) : 0u;

  // Row-major stand-ins (contiguous copies for other layouts, written back at the end).
  ContiguousCopies cc;
  std::vector<at::Tensor> Pc(n), Gc(n), Mc(n), Rc(row_vars.size()), Cc(col_vars.size()),
      Vc(variances.size());
  std::vector<AfTensor> ts(n);
  std::vector<PassFns> fns(n);
  AfWork w;
  w.n = static_cast<int64_t>(n);
  w.eps1_sq = eps1 * eps1;
  int64_t rows_total = 0, dens_total = 0;
  std::vector<int64_t> fidx(n, -1);  // factored index of param i
  for (size_t i = 0, kf = 0, kv = 0; i < n; ++i) {
    AfTensor& a = ts[i];
    const double step = increment_step(state_steps[i]);
    a.factored = P[i].dim() >= 2;
    a.numel = P[i].numel();
    const size_t k = a.factored ? kf++ : kv++;
    if (a.numel == 0) continue;  // nothing to update (torch divides by zero here)
    Pc[i] = cc.get(P[i], true);
    Gc[i] = cc.get(grads[i], false);
    if (use_master) Mc[i] = cc.get(master_params[i], true);
    a.p = Pc[i].data_ptr();
    a.g = Gc[i].data_ptr();
    a.master = use_master ? Mc[i].data_ptr<float>() : nullptr;
    const AdafactorCoeffsOf<double> c = adafactor_coeffs<double>(lr_v, step, beta2_decay,
                                                                 weight_decay);
    a.one_minus_beta2 = c.one_minus_beta2;
    a.decay_factor = c.decay_factor;
    a.rho = c.rho;
    a.grad_mul = grad_mul;
    a.sr_key = sr_tensor_key(seed, static_cast<uint32_t>(i));
    at::ScalarType st;
    if (a.factored) {
      fidx[i] = static_cast<int64_t>(k);
      Rc[k] = cc.get(row_vars[k], true);
      Cc[k] = cc.get(col_vars[k], true);
      st = Rc[k].scalar_type();
      a.cols = P[i].size(-1);
      a.rows = P[i].size(-2);
      const int64_t batch = a.numel / (a.rows * a.cols);
      a.row_off = rows_total;
      a.col_off = w.total_cols;
      a.den_off = dens_total;
      rows_total += batch * a.rows;
      w.total_cols += batch * a.cols;
      dens_total += batch;
      a.var = nullptr;
    } else {
      Vc[k] = cc.get(variances[k], true);
      st = Vc[k].scalar_type();
      a.var = Vc[k].data_ptr();
    }
    fns[i] = wide ? pick_storage_for<PickAdafactor, double>(P[i].scalar_type(), st, store,
                                                            weight_decay != 0.0)
                  : pick_storage<PickAdafactor>(P[i].scalar_type(), st, store,
                                                weight_decay != 0.0);
  }

  // Work items: whole rows of factored tensors (about kCpuChunk elements per item),
  // kCpuChunk-element chunks of vectors.
  std::vector<Item> items;
  for (size_t i = 0; i < n; ++i) {
    const AfTensor& a = ts[i];
    if (a.numel == 0) continue;
    if (a.factored) {
      const int64_t nrows = a.numel / a.cols;
      const int64_t step = std::max<int64_t>(1, kCpuChunk / a.cols);
      for (int64_t r = 0; r < nrows; r += step)
        items.push_back({static_cast<int32_t>(i), r, std::min(nrows, r + step)});
    } else {
      for (int64_t b = 0; b < a.numel; b += kCpuChunk)
        items.push_back({static_cast<int32_t>(i), b, std::min(a.numel, b + kCpuChunk)});
    }
  }
  const int threads = std::max(1, at::get_num_threads());
  w.row_sum.assign(rows_total, 0.0);
  w.col_sum.assign(static_cast<size_t>(threads) * w.total_cols, 0.0);
  auto size_factors = [&](auto& f) {
    f.row_var.assign(rows_total, 0);
    f.col_var.assign(w.total_cols, 0);
    f.den.assign(dens_total, 0);
  };
  if (wide)
    size_factors(w.f64);
  else
    size_factors(w.f32);
  w.sum_p2.assign(static_cast<size_t>(threads) * n, 0.0);
  w.sum_u2.assign(static_cast<size_t>(threads) * n, 0.0);

  auto run_pass = [&](PassFn PassFns::*which) {
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t ib, int64_t ie) {
      const int thread = std::min(at::get_thread_num(), threads - 1);
      for (int64_t k = ib; k < ie; ++k) {
        const Item& it = items[k];
        (fns[it.t].*which)(ts[it.t], w, it.begin, it.end, thread, it.t);
      }
    });
  };

  run_pass(&PassFns::a);

  for (size_t i = 0; i < n; ++i) {
    const AfTensor& a = ts[i];
    if (!a.factored || a.numel == 0) continue;
    const at::Tensor& rv = Rc[fidx[i]];
    if (wide)
      update_factors<double>(a, w, rv.data_ptr(), Cc[fidx[i]].data_ptr(), rv.scalar_type(), eps1,
                             threads);
    else
      update_factors<float>(a, w, rv.data_ptr(), Cc[fidx[i]].data_ptr(), rv.scalar_type(), eps1,
                            threads);
  }

  run_pass(&PassFns::b);

  for (size_t i = 0; i < n; ++i) {
    AfTensor& a = ts[i];
    if (a.numel == 0) continue;
    double p2 = 0.0, u2 = 0.0;
    for (int th = 0; th < threads; ++th) {
      p2 += w.sum_p2[th * n + i];
      u2 += w.sum_u2[th * n + i];
    }
    a.step_size = adafactor_step_size(p2, u2, static_cast<double>(a.numel), eps2, a.rho, d);
  }

  run_pass(&PassFns::c);

  cc.finish();
  for (auto list : {params, row_vars, col_vars, variances, master_params, state_steps})
    bump_versions(list);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dlopt_C, m) {
  m.def(
      "adafactor_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] row_vars, "
      "Tensor(c!)[] col_vars, Tensor(d!)[] variances, Tensor(e!)[] master_params, "
      "Tensor(f!)[] state_steps, Tensor lr, float beta2_decay, float eps1, float eps2, float d, "
      "float weight_decay, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? sr_seed) -> ()");
}

TORCH_LIBRARY_IMPL(dlopt_C, CPU, m) { m.impl("adafactor_step", &adafactor_step_cpu); }

}  // namespace dlopt
