// C entry points over the real CUDA launchers of the element-wise optimizers
// (csrc/cuda/optim_{adam,sgd,adagrad,lion,rmsprop}.cu), LAMB (optim_lamb.cu), Adafactor
// (optim_adafactor.cu: its kernel bodies run as emulated threads, cuda_threads.cuh) and
// the norm (multi_tensor_norm.cu), built with -DDLOPT_EMULATE
// into a host-only shared library by tests/test_cuda_emulation.py: every launch runs
// on the CPU (multi_tensor_apply.cuh emulate_blocks), so the launchers' whole device
// side (per-tensor coefficients and steps, dtype dispatch, tables, the Ops, storage
// adapters, stochastic rounding, master weights) meets CPU tensors, which the test
// compares with the C++ CPU kernels bit for bit. What it cannot see: the device
// compiler's arithmetic (the GPU tests compare that).
//
// The arguments are flat arrays, as ctypes passes them (n params):
//   ptrs[n * kMaxLists]  each param's lists in its launcher's order (cuda_launch.h), or 0
//   numels[n], dtypes[2 * n] (param, state: cuda::DType codes), new_buffer[n] (SGD)
//   steps[n], step_double[n]  the step tensors (steps may be null: SGD)
//   scalar_ptrs[5], scalar_dtypes[5], scalar_values[5], seed_ivalue: lr, grad_scale,
//       found_inf, sr_seed, global_grad_norm (LAMB) as ScalarRef (a null pointer: the
//       value, as a CPU tensor's)
//   store  cuda::StoreMode; hp[], flags[]  the launcher's own arguments, in its order
// dlopt_emulate_step_shaped (Adafactor) also takes rows[n], cols[n]: a factored
// tensor's last two dims (0 for a vector), and no new_buffer.
// Returns the launcher's cudaError_t (0: success), or -1 for an unknown op.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dlopt/cuda_launch.h"

using namespace dlopt::cuda;

namespace {

// Scratch memory (Adam's per-tensor coefficients) from malloc, freed after the call.
struct Scratches {
  std::vector<void*> blocks;
  ~Scratches() {
    for (void* p : blocks) std::free(p);
  }
  static void* alloc(void* self, size_t bytes) {
    void* p = std::malloc(bytes == 0 ? 1 : bytes);
    static_cast<Scratches*>(self)->blocks.push_back(p);
    return p;
  }
};

ScalarRef scalar(const void* ptr, int32_t dtype, double value, int64_t ivalue) {
  ScalarRef r;
  r.ptr = ptr;
  r.dtype = static_cast<DType>(dtype);
  r.value = value;
  r.ivalue = ivalue;
  return r;
}

// One launcher call built from the entry points' arrays (rows, cols, new_buffer and
// steps may be null); `l` is what the launcher gets.
struct Call {
  std::vector<ParamEntry> entries;
  std::vector<StepRef> step_refs;
  Scratches scratch;
  Launch l{};

  Call(int32_t n, void* const* ptrs, const int64_t* numels, const int64_t* rows,
       const int64_t* cols, const int32_t* dtypes, const uint8_t* new_buffer,
       void* const* steps, const uint8_t* step_double, const void* const* scalar_ptrs,
       const int32_t* scalar_dtypes, const double* scalar_values, int64_t seed_ivalue,
       int32_t store)
      : entries(n) {
    for (int32_t i = 0; i < n; ++i) {
      ParamEntry& e = entries[i];  // value-initialized: zero
      for (int k = 0; k < kMaxLists; ++k) e.ptr[k] = ptrs[i * kMaxLists + k];
      e.numel = numels[i];
      e.rows = rows != nullptr ? rows[i] : 0;
      e.cols = cols != nullptr ? cols[i] : 0;
      e.index = i;
      e.param = static_cast<DType>(dtypes[2 * i]);
      e.state = static_cast<DType>(dtypes[2 * i + 1]);
      e.new_buffer = new_buffer != nullptr && new_buffer[i] != 0;
      if (steps != nullptr) step_refs.push_back({steps[i], step_double[i] != 0});
    }
    l.entries = entries.data();
    l.n = n;
    l.steps = steps != nullptr ? step_refs.data() : nullptr;
    l.lr = scalar(scalar_ptrs[0], scalar_dtypes[0], scalar_values[0], 0);
    l.grad_scale = scalar(scalar_ptrs[1], scalar_dtypes[1], scalar_values[1], 1);
    l.found_inf = scalar(scalar_ptrs[2], scalar_dtypes[2], scalar_values[2], 0);
    l.seed = scalar(scalar_ptrs[3], scalar_dtypes[3], scalar_values[3], seed_ivalue);
    l.store = static_cast<StoreMode>(store);
    l.stream = nullptr;
    l.scratch = {&Scratches::alloc, &scratch};
  }
  Call(const Call&) = delete;
};

}  // namespace

extern "C" int dlopt_emulate_step(const char* op, int32_t n, void* const* ptrs,
                                  const int64_t* numels, const int32_t* dtypes,
                                  const uint8_t* new_buffer, void* const* steps,
                                  const uint8_t* step_double, const void* const* scalar_ptrs,
                                  const int32_t* scalar_dtypes, const double* scalar_values,
                                  int64_t seed_ivalue, int32_t store, const double* hp,
                                  const int32_t* flags) {
  const Call c(n, ptrs, numels, nullptr, nullptr, dtypes, new_buffer, steps, step_double,
               scalar_ptrs, scalar_dtypes, scalar_values, seed_ivalue, store);
  const Launch& l = c.l;
  const auto name = [&](const char* s) { return std::strcmp(op, s) == 0; };
  if (name("adam"))
    return launch_adam_step(l, hp[0], hp[1], hp[2], hp[3], flags[0], flags[1], flags[2]);
  if (name("sgd")) return launch_sgd_step(l, hp[0], hp[1], hp[2], flags[0], flags[1]);
  if (name("adagrad")) return launch_adagrad_step(l, hp[0], hp[1], hp[2], flags[0]);
  if (name("lion")) return launch_lion_step(l, hp[0], hp[1], hp[2], flags[0]);
  if (name("rmsprop"))
    return launch_rmsprop_step(l, hp[0], hp[1], hp[2], hp[3], flags[0], flags[1]);
  if (name("lamb"))
    return launch_lamb_step(l, scalar(scalar_ptrs[4], scalar_dtypes[4], scalar_values[4], 0),
                            hp[0], hp[1], hp[2], hp[3], flags[0], hp[4]);
  return -1;
}

// The launchers that need each param's shape (Adafactor); otherwise as above.
extern "C" int dlopt_emulate_step_shaped(const char* op, int32_t n, void* const* ptrs,
                                         const int64_t* numels, const int64_t* rows,
                                         const int64_t* cols, const int32_t* dtypes,
                                         void* const* steps, const uint8_t* step_double,
                                         const void* const* scalar_ptrs,
                                         const int32_t* scalar_dtypes,
                                         const double* scalar_values, int64_t seed_ivalue,
                                         int32_t store, const double* hp, const int32_t* flags) {
  if (std::strcmp(op, "adafactor") != 0) return -1;
  const Call c(n, ptrs, numels, rows, cols, dtypes, nullptr, steps, step_double, scalar_ptrs,
               scalar_dtypes, scalar_values, seed_ivalue, store);
  return launch_adafactor_step(c.l, hp[0], hp[1], hp[2], hp[3], hp[4], flags[0]);
}

// multi_tensor_norm's launcher on n tensors (ptrs[n], numels[n], dtypes[n] as DType
// codes): the per-tensor norms into norms[n] and the total into *total.
extern "C" int dlopt_emulate_norm(int32_t n, void* const* ptrs, const int64_t* numels,
                                  const int32_t* dtypes, double norm_type, float* norms,
                                  float* total) {
  std::vector<ParamEntry> entries(n);
  for (int32_t i = 0; i < n; ++i) {
    ParamEntry& e = entries[i];  // value-initialized: zero
    e.ptr[0] = ptrs[i];
    e.numel = numels[i];
    e.index = i;
    e.param = static_cast<DType>(dtypes[i]);
  }
  Scratches scratch;
  Launch l{};
  l.entries = entries.data();
  l.n = n;
  l.stream = nullptr;
  l.scratch = {&Scratches::alloc, &scratch};
  return static_cast<int>(launch_multi_tensor_norm(l, norm_type, norms, total));
}
