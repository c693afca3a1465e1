// Multi-tensor apply, shared by every optimizer op: run one element-wise
// functor over many tensors (each with N parallel "lists": param, grad,
// states, ...) in a few kernel launches.
//
// Host side (group_by_dtype, for_each_table, multi_tensor_apply): the launcher turns
// the call's ParamEntry list (dlopt/cuda_launch.h) into vectors of TensorEntry (N raw
// pointers + numel + per-tensor metadata), one per dtype group. They are packed
// into a table that travels by value as the kernel argument (no device-side
// buffer, no host->device copy, nothing that breaks CUDA graph capture): under
// the classic 4 KB parameter limit, or 32 KB where CUDA 12.1+ allows it and the
// call needs more than one 4 KB table (kLargeArgs). Each tensor is cut into chunks
// of the table's `chunk` elements (kChunk, or less when a call is too small to fill
// the GPU: chunk_for), one thread block per chunk; a block finds its tensor from the
// slots' running block counts (locate), so a table's size bounds its tensors, not
// its blocks. When the table runs out of tensor slots it is launched and refilled.
// Indices are 64-bit (numel, chunk start), so tensors over 2^31 elements are fine.
//
// Device side (run_thread): each thread handles kILP elements per iteration.
// The functor never touches memory: run_thread loads every list into fp32
// registers through the list's storage adapter (dlopt/cuda_storage.cuh), calls
// the functor per element, and stores the lists the functor writes. A block
// uses one 16-byte (fp32) / 8-byte (16-bit) vector access per list and thread
// when every pointer of its tensor is aligned for it and the chunk length is a
// multiple of kILP, and coalesced scalar accesses otherwise.
//
// An Op (functor) provides (member functions __host__ __device__, so a CPU loop
// can emulate a launch in tests):
//   static constexpr int kLists;                 // N
//   template <int K> using List = Access<Storage, kRead|kWrite|kReadWrite>;  or NoAccess
//   using Meta = ...;                            // per-tensor, trivially copyable
//   struct Block {...};                          // per-block state, built by begin()
//   bool begin(const Meta&, Block&) const;       // false: skip this block
//   void operator()(float (&x)[kLists], const Block&, int64_t index) const;
// `index` is the element's index in its tensor. The Op object itself (trivially
// copyable: device pointers, hyperparameters) is part of the table and so is
// shared by every block of a launch.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include "dlopt/cuda_launch.h"
#include "dlopt/cuda_storage.cuh"
#include "dlopt/macros.h"

// 32 KB kernel arguments: CUDA 12.1+ and no architecture below sm_70 in the build
// (setup.py defines DLOPT_NO_LARGE_ARGS then).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12010 && !defined(DLOPT_NO_LARGE_ARGS)
#define DLOPT_LARGE_ARGS 1
#else
#define DLOPT_LARGE_ARGS 0
#endif

namespace dlopt {
namespace mta {

constexpr int kILP = 4;
constexpr int kChunk = 65536;  // elements per block at most; multiple of kILP
constexpr int kBlockSize = 512;
constexpr int kMinChunk = kBlockSize * kILP;  // one vector per thread
constexpr int kArgBudget = 4000;  // bytes of kernel argument we allow ourselves (< 4096)

enum : int { kRead = 1, kWrite = 2, kReadWrite = 3 };

// How one list is accessed: its storage adapter and read/write mode.
template <class S, int MODE>
struct Access {
  using Storage = S;
  using T = typename S::T;
  static constexpr bool kUsed = true;
  static constexpr bool kReads = (MODE & kRead) != 0;
  static constexpr bool kWrites = (MODE & kWrite) != 0;
};

// A list slot this Op instantiation does not use (pointer may be null).
struct NoAccess {
  using T = char;
  static constexpr bool kUsed = false;
  static constexpr bool kReads = false;
  static constexpr bool kWrites = false;
};

template <int N, class Meta>
struct TensorEntry {
  void* ptr[N];
  int64_t numel;
  Meta meta;
};

// Kernel-argument budgets of a table. kSmallArgs fits the classic 4 KB parameter
// limit of every CUDA version; kLargeArgs needs the 32,764 bytes CUDA 12.1 allows
// (toolkit and driver 12.1+, sm_70+: large_args_supported). Why large tables: a
// 4 KB table holds 60 of Adam's tensors, so the GPT-2-small list (148 tensors) took
// three launches and 1,000 small tensors 17, and every kernel boundary idles the GPU
// while the launch's last blocks finish. A 32 KB table holds 498: GPT-2 in one launch,
// 1,000 small tensors in three (counted by tests/cuda_emulation/mta_emulation.cu).
constexpr int kSmallArgs = kArgBudget;
constexpr int kLargeArgs = 32000;

// Blocks per launch at most (a grid's x dimension takes 2^31 - 1).
constexpr int kMaxBlocks = 1 << 30;

// Tensor slots of a table from an argument budget of BYTES: a slot holds the N
// addresses, the numel, the Meta and the slot's end in the launch's blocks.
// (64: padding; 12: the chunk size, slot 0's first chunk and the slot count.)
template <int N, class Meta, class Op, int BYTES = kSmallArgs>
struct Capacity {
  static constexpr int kPerTensor = N * 8 + 8 + static_cast<int>(sizeof(Meta)) + 4;
  static constexpr int kFree = BYTES - static_cast<int>(sizeof(Op)) - 64 - 12;
  static constexpr int kTensors = kFree / kPerTensor;
  static_assert(kTensors >= 8, "multi_tensor_apply: per-tensor data too large for the table");
};

// One launch's tensors. Block b works on one chunk of `chunk` elements of the slot s
// with block_end[s - 1] <= b < block_end[s] (`locate`): the blocks of a slot are its
// tensor's chunks in order, from chunk 0, except in slot 0, which may hold the rest
// of a tensor begun in the previous table (from chunk first_chunk). No per-block
// entries: a table's blocks are bounded only by kMaxBlocks, so a call's chunk size is
// free of the table's size and a call of up to kTensors tensors is one launch.
template <class Op, int BYTES = kSmallArgs>
struct Table {
  static constexpr int N = Op::kLists;
  static constexpr int kBytes = BYTES;
  using Meta = typename Op::Meta;
  using Cap = Capacity<N, Meta, Op, BYTES>;
  void* ptr[N][Cap::kTensors];
  int64_t numel[Cap::kTensors];
  Meta meta[Cap::kTensors];
  int32_t block_end[Cap::kTensors];  // blocks of slots 0..s together
  Op op;
  // int32 chunk indices: 2^31 chunks of kMinChunk elements (2^42) exceed any GPU's
  // memory (a DLOPT_CUDA_CHUNK below kMinChunk is for timing small cases only)
  int32_t first_chunk;  // slot 0's first chunk
  int32_t chunk;        // elements per block (the last chunk of a tensor may be shorter)
  int32_t tensors;      // slots in use
};

// Block `block`'s slot and the index of its chunk in that slot's tensor. The slot is
// how many slots end at or before the block (block_end only grows), counted by a
// search over powers of two: nine steps for 498 slots, once per block (run_thread),
// against the thousands of elements (kMinChunk at least) a block moves.
template <class Tab>
DLOPT_HD void locate(const Tab& tab, int block, int& slot, int& chunk) {
  constexpr int kTop = [] {
    int p = 1;
    while (p * 2 <= Tab::Cap::kTensors) p *= 2;
    return p;
  }();
  const int last = tab.tensors - 1;  // the last slot ends after every block of the table
  int lo = 0;
#pragma unroll
  for (int step = kTop; step > 0; step >>= 1)
    if (lo + step <= last && tab.block_end[lo + step - 1] <= block) lo += step;
  slot = lo;
  chunk = lo == 0 ? tab.first_chunk + block : block - tab.block_end[lo - 1];
}

template <class T>
struct alignas(sizeof(T) * kILP) Vec {
  T v[kILP];
};

// Compile-time loop over list indices 0..N-1 (f gets std::integral_constant<int, K>).
template <class F, int... K>
DLOPT_HD void static_for_impl(F&& f, std::integer_sequence<int, K...>) {
  (f(std::integral_constant<int, K>{}), ...);
}
template <int N, class F>
DLOPT_HD void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// The work of thread `thread` of block `block`. Host-callable too: threads of a
// block share nothing but where the block works (which each would find alike), so a
// CPU loop over (block, thread) emulates a launch exactly, which lets CPU-only
// machines test this indexing.
// `acc...` (none for element-wise ops) is passed on to every functor call: a
// per-thread accumulator of reducing ops (dlopt/multi_tensor_reduce.cuh).
template <class Op, int BYTES, class... Acc>
DLOPT_HD void run_thread(const Table<Op, BYTES>& tab, int block, int thread, int nthreads,
                         Acc&... acc) {
  constexpr int N = Op::kLists;
  // Where the block works. On the GPU thread 0 searches and the block reads its answer
  // from shared memory: searched by every thread, the slot's values took registers
  // the loop needed (ptxas spilled in the six-list Adam and RMSprop kernels), read
  // from shared memory they did not. Every thread of a block calls run_thread.
  int slot = 0, chunk = 0;
#ifdef __CUDA_ARCH__
  __shared__ int where[2];
  if (thread == 0) {
    locate(tab, block, slot, chunk);
    where[0] = slot;
    where[1] = chunk;
  }
  __syncthreads();
  slot = where[0];
  chunk = where[1];
#else
  locate(tab, block, slot, chunk);
#endif
  const int64_t begin = static_cast<int64_t>(chunk) * tab.chunk;
  const int64_t left = tab.numel[slot] - begin;
  const int n = left < tab.chunk ? static_cast<int>(left) : tab.chunk;

  typename Op::Block blk;
  if (!tab.op.begin(tab.meta[slot], blk)) return;

  // Chunk base pointers, typed per list; all lists share one flat index.
  void* base[N];
  bool aligned = (n % kILP) == 0;
  static_for<N>([&](auto k) {
    using L = typename Op::template List<decltype(k)::value>;
    if constexpr (L::kUsed) {
      auto* p = static_cast<typename L::T*>(tab.ptr[k][slot]) + begin;
      base[k] = p;
      aligned = aligned && reinterpret_cast<uintptr_t>(p) % sizeof(Vec<typename L::T>) == 0;
    }
  });

  float x[kILP][N];
  if (aligned) {
    for (int i = thread * kILP; i < n; i += nthreads * kILP) {
      static_for<N>([&](auto k) {
        using L = typename Op::template List<decltype(k)::value>;
        if constexpr (L::kReads) {
          const auto v = reinterpret_cast<const Vec<typename L::T>*>(base[k])[i / kILP];
#pragma unroll
          for (int j = 0; j < kILP; ++j) x[j][k] = L::Storage::load(v.v[j]);
        } else {
#pragma unroll
          for (int j = 0; j < kILP; ++j) x[j][k] = 0.f;
        }
      });
#pragma unroll
      for (int j = 0; j < kILP; ++j) tab.op(x[j], blk, begin + i + j, acc...);
      static_for<N>([&](auto k) {
        using L = typename Op::template List<decltype(k)::value>;
        if constexpr (L::kWrites) {
          Vec<typename L::T> v;
#pragma unroll
          for (int j = 0; j < kILP; ++j) v.v[j] = L::Storage::store(x[j][k], blk, begin + i + j);
          reinterpret_cast<Vec<typename L::T>*>(base[k])[i / kILP] = v;
        }
      });
    }
  } else {
    // Element j of a thread sits nthreads apart, so each access is coalesced.
    for (int i0 = 0; i0 < n; i0 += nthreads * kILP) {
      static_for<N>([&](auto k) {
        using L = typename Op::template List<decltype(k)::value>;
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          const int i = i0 + thread + j * nthreads;
          x[j][k] = 0.f;
          if constexpr (L::kReads) {
            if (i < n) x[j][k] = L::Storage::load(static_cast<const typename L::T*>(base[k])[i]);
          }
        }
      });
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        const int i = i0 + thread + j * nthreads;
        if (i < n) tab.op(x[j], blk, begin + i, acc...);
      }
      static_for<N>([&](auto k) {
        using L = typename Op::template List<decltype(k)::value>;
        if constexpr (L::kWrites) {
#pragma unroll
          for (int j = 0; j < kILP; ++j) {
            const int i = i0 + thread + j * nthreads;
            if (i < n)
              static_cast<typename L::T*>(base[k])[i] = L::Storage::store(x[j][k], blk, begin + i);
          }
        }
      });
    }
  }
}

// __grid_constant__: run_thread takes the table by reference; without it the
// compiler would copy the whole table into per-thread local memory.
// Launch bounds (512, 2) cap registers at 64 so two blocks fit per SM (some
// instantiations wanted 112, i.e. one block); ptxas reports no spills.
template <class Op, int BYTES>
__global__ void __launch_bounds__(kBlockSize, 2)
    multi_tensor_kernel(const __grid_constant__ Table<Op, BYTES> tab) {
  run_thread(tab, blockIdx.x, threadIdx.x, blockDim.x);
}

#ifdef DLOPT_EMULATE
// DLOPT_EMULATE (a host-only build: tests/cuda_emulation/launchers.cu): launches run on
// the CPU, every thread of every block in a loop (exact: see run_thread), chunked as on
// an H100 (132 SMs x 2 blocks).
constexpr int kEmulatedResident = 264;

template <class Tab>
void emulate_blocks(const Tab& tab, int blocks) {
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < kBlockSize; ++t) run_thread(tab, b, t, kBlockSize);
}
#endif

// The call's non-empty entries as TensorEntry lists, one per (param dtype, state
// dtype) group (each group is one template instantiation of the Op); meta(entry) gives
// an entry's Meta.
template <int N, class Meta, class MetaFn>
std::map<std::pair<cuda::DType, cuda::DType>, std::vector<TensorEntry<N, Meta>>> group_by_dtype(
    const cuda::Launch& l, MetaFn&& meta) {
  static_assert(N <= cuda::kMaxLists, "more lists than a ParamEntry holds");
  std::map<std::pair<cuda::DType, cuda::DType>, std::vector<TensorEntry<N, Meta>>> groups;
  for (int32_t i = 0; i < l.n; ++i) {
    const cuda::ParamEntry& e = l.entries[i];
    if (e.numel == 0) continue;
    TensorEntry<N, Meta> t;
    std::copy(e.ptr, e.ptr + N, t.ptr);
    t.numel = e.numel;
    t.meta = meta(e);
    groups[{e.param, e.state}].push_back(t);
  }
  return groups;
}

// The Meta of ops that need only the tensor's index.
inline int32_t tensor_index(const cuda::ParamEntry& e) { return e.index; }

// Elements per block for a launch of `total` elements on a GPU that holds `resident`
// blocks at once: kChunk, less when that would leave the last wave partly empty. The
// call then takes whole waves of equal chunks (in multiples of kMinChunk): one 10M
// fp32 tensor would be 153 chunks of 64K on 264 slots (an H200 holds 132 SMs x 2
// blocks), leaving 111 SMs with half the work of the others; as 257 chunks of 38912
// every slot works alike. Calls of many waves keep kChunk (within a few percent).
// Measured on an H100 (session 9) against DLOPT_CUDA_CHUNK=65536: within the spread.
inline int chunk_for(int64_t total, int resident) {
  if (resident <= 0 || total <= 0) return kChunk;
  const int64_t wave = static_cast<int64_t>(resident) * kChunk;
  const int64_t waves = (total + wave - 1) / wave;
  const int64_t per_block = (total + waves * resident - 1) / (waves * resident);
  const int64_t rounded = (per_block + kMinChunk - 1) / kMinChunk * kMinChunk;
  return static_cast<int>(std::min<int64_t>(kChunk, std::max<int64_t>(kMinChunk, rounded)));
}

// How many blocks of `kernel` (with `threads` threads a block) the current device holds
// at once (chunk_for's waves): the occupancy query runs once per (kernel, device). 0
// when unknown (a failed query, whose error is cleared: it is not sticky).
template <class Kernel>
int resident_blocks(Kernel* kernel, int threads) {
  constexpr int kMaxDevices = 64;
  static int resident[kMaxDevices] = {};  // per instantiation: 0 = not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return 0;
  }
  if (resident[dev] == 0) {
    int per_sm = 0, sms = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    resident[dev] = per_sm * sms > 0 ? per_sm * sms : -1;  // -1: asked, unknown
  }
  return std::max(resident[dev], 0);
}

// DLOPT_CUDA_CHUNK (elements, a multiple of kILP up to 2^24) fixes the chunk size of
// element-wise launches instead of chunk_for; for A/B timing only. Else -1.
inline int chunk_override() {
  static const int chunk = [] {
    const char* v = std::getenv("DLOPT_CUDA_CHUNK");
    const long c = v == nullptr ? -1 : std::strtol(v, nullptr, 10);
    return c >= kILP && c <= (1L << 24) && c % kILP == 0 ? static_cast<int>(c) : -1;
  }();
  return chunk;
}

// Packs the non-empty entries, cut into chunks of `chunk` elements (a multiple of
// kILP), into tables of BYTES (kSmallArgs or kLargeArgs) of at most max_blocks blocks
// and calls fn(table, number_of_blocks) -> cudaError_t for each, stopping at the first
// error; host-only and CUDA-free (multi_tensor_apply launches from fn). A table is
// launched when its tensor slots or max_blocks run out; a tensor whose chunks do not
// all fit goes on in slot 0 of the next table.
template <int BYTES = kSmallArgs, class Op, class Fn>
cudaError_t for_each_table(
    const std::vector<TensorEntry<Op::kLists, typename Op::Meta>>& entries, const Op& op,
    int max_blocks, Fn&& fn, int chunk = kChunk) {
  using Tab = Table<Op, BYTES>;
  using Cap = typename Tab::Cap;
  static_assert(sizeof(Tab) <= BYTES + 64, "multi_tensor_apply: kernel argument over budget");
  static_assert(sizeof(Tab) <= 32764, "multi_tensor_apply: kernel argument over 32,764 bytes");
  static_assert(std::is_trivially_copyable<Op>::value, "Op must be trivially copyable");
  constexpr int N = Op::kLists;

  const int64_t limit = std::max(1, std::min(kMaxBlocks, max_blocks));
  Tab tab;  // 32 KB at most: on the stack, like any kernel argument
  tab.op = op;
  tab.chunk = chunk;
  tab.first_chunk = 0;
  int nt = 0;
  int64_t nb = 0;
  auto launch = [&]() {
    tab.tensors = nt;
    const cudaError_t err = fn(static_cast<const Tab&>(tab), static_cast<int>(nb));
    nt = 0;
    nb = 0;
    return err;
  };
  for (const auto& e : entries) {
    if (e.numel <= 0) continue;
    const int64_t chunks = (e.numel + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks;) {
      if (nt == 0) tab.first_chunk = static_cast<int32_t>(c);
      const int64_t take = std::min(chunks - c, limit - nb);
      for (int k = 0; k < N; ++k) tab.ptr[k][nt] = e.ptr[k];
      tab.numel[nt] = e.numel;
      tab.meta[nt] = e.meta;
      nb += take;
      tab.block_end[nt++] = static_cast<int32_t>(nb);
      c += take;
      if (nb == limit || nt == Cap::kTensors) DLOPT_CUDA_TRY(launch());
    }
  }
  if (nt > 0) DLOPT_CUDA_TRY(launch());
  return cudaSuccess;
}

// Whether tables of `bytes` (kSmallArgs or kLargeArgs) fit a kernel argument on the
// current device. 4 KB always do. 32 KB need CUDA 12.1 in both the toolkit that built
// us and the driver, and compute capability 7.0+ (DLOPT_LARGE_ARGS); DLOPT_CUDA_SMALL_TABLES (any value)
// turns them off, for the A/B of tools/gpu_check.sh. Queried once per device.
inline bool large_args_supported() {
#ifdef DLOPT_EMULATE
  return std::getenv("DLOPT_CUDA_SMALL_TABLES") == nullptr;  // read per call: tests switch
#elif DLOPT_LARGE_ARGS
  static const bool off = std::getenv("DLOPT_CUDA_SMALL_TABLES") != nullptr;
  static int driver = -1;
  constexpr int kMaxDevices = 64;
  static int ok[kMaxDevices] = {};  // 0: not asked yet, 1: yes, -1: no
  if (off) return false;
  if (driver < 0 && cudaDriverGetVersion(&driver) != cudaSuccess) {
    (void)cudaGetLastError();
    driver = 0;
  }
  if (driver < 12010) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return false;
  }
  if (ok[dev] == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      (void)cudaGetLastError();
      major = 0;
    }
    ok[dev] = major >= 7 ? 1 : -1;
  }
  return ok[dev] > 0;
#else
  return false;
#endif
}

// A call's non-empty tensors and their blocks at `chunk`-element chunks.
struct CallSize {
  int64_t tensors = 0;
  int64_t blocks = 0;
};

template <int N, class Meta>
CallSize call_size(const std::vector<TensorEntry<N, Meta>>& entries, int chunk) {
  CallSize s;
  for (const auto& e : entries) {
    if (e.numel == 0) continue;
    ++s.tensors;
    s.blocks += (e.numel + chunk - 1) / chunk;
  }
  return s;
}

// Whether a call of `size` fits one table of BYTES: then a larger table gains nothing
// (one launch either way) and costs a longer kernel argument to copy.
template <int BYTES, class Op>
bool fits_one_table(const CallSize& size) {
  return size.tensors <= Table<Op, BYTES>::Cap::kTensors && size.blocks <= kMaxBlocks;
}

// The launches of a call of Op (multi_tensor_apply, multi_tensor_reduce), each by
// launch(table, blocks), generic over the table's size (Table::kBytes). A call that
// needs more than one 4 KB table goes in 32 KB tables where the device takes them
// (large_args_supported); should the first 32 KB launch still be refused (nothing
// has run then), 32 KB tables are switched off for the process and the call goes in
// 4 KB tables.
template <class Op, class Launch>
cudaError_t launch_call(const std::vector<TensorEntry<Op::kLists, typename Op::Meta>>& entries,
                        const Op& op, int chunk, Launch&& launch) {
  int launched = 0;
  auto counted = [&](const auto& tab, int blocks) {
    ++launched;
    return launch(tab, blocks);
  };
  const CallSize size = call_size(entries, chunk);  // one walk, for both table sizes
#if DLOPT_LARGE_ARGS
  static std::atomic<bool> large_refused{false};
  if (!large_refused && large_args_supported() && !fits_one_table<kSmallArgs, Op>(size)) {
    const cudaError_t err = for_each_table<kLargeArgs>(entries, op, kMaxBlocks, counted, chunk);
    if (err == cudaSuccess || launched > 1) return err;
    large_refused = true;  // the first launch failed: nothing ran
  }
#endif
  return for_each_table<kSmallArgs>(entries, op, kMaxBlocks, counted, chunk);
}

// Launches Op over every entry on `stream` (of the current device, which the host
// half set). Empty tensors are skipped.
template <class Op>
cudaError_t multi_tensor_apply(
    const std::vector<TensorEntry<Op::kLists, typename Op::Meta>>& entries, const Op& op,
    cudaStream_t stream) {
#ifdef DLOPT_EMULATE
  (void)stream;
  const int resident = kEmulatedResident;
#else
  const int resident = resident_blocks(multi_tensor_kernel<Op, kSmallArgs>, kBlockSize);
#endif
  int64_t total = 0;
  for (const auto& e : entries) total += e.numel;
  const int chunk = chunk_override() > 0 ? chunk_override() : chunk_for(total, resident);
  return launch_call(entries, op, chunk, [&](const auto& tab, int blocks) {
#ifdef DLOPT_EMULATE
    emulate_blocks(tab, blocks);
    return cudaSuccess;
#else
    constexpr int kBytes = std::decay_t<decltype(tab)>::kBytes;
    multi_tensor_kernel<Op, kBytes><<<blocks, kBlockSize, 0, stream>>>(tab);
    return cudaGetLastError();
#endif
  });
}

// The launch of an element-wise op: for each dtype group of the call (group_by_dtype,
// meta(entry) the Op's Meta), Pick<PS, S, MASTER>::run(args..., entries, stream) as
// cuda::pick_storage chooses it (args: the Op's runtime choices, then its shared data).
template <template <class, class, bool> class Pick, int N, class Meta, class MetaFn,
          class... Args>
cudaError_t apply_by_dtype(const cuda::Launch& l, MetaFn&& meta, const Args&... args) {
  for (const auto& [key, entries] : group_by_dtype<N, Meta>(l, meta))
    DLOPT_CUDA_TRY(cuda::pick_storage<Pick>(key.first, key.second, l.store, args..., entries,
                                            l.stream));
  return cudaSuccess;
}

}  // namespace mta
}  // namespace dlopt
