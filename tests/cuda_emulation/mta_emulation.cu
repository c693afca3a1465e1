// Runs multi-tensor apply's host packing (mta::for_each_table) and its per-thread
// device code (mta::run_thread) on the CPU: every (block, thread) of every table is
// emulated in a loop, which is exact because the threads of a block share nothing but
// where the block works (each emulated thread finds it alike). Built by nvcc as a host-only program (no GPU, no CUDA call) by
// tests/test_cuda_emulation.py, which runs it and expects "ok" on the last line.
//
// Checks, for odd tensor sizes, misaligned pointers (the scalar path) and every block
// limit from 1 block up: each element is visited exactly once with its own index and
// its tensor's Meta (so mta::locate finds every block's tensor and chunk); nothing
// outside a tensor is touched; no table exceeds the block limit or its tensor slots,
// and a table's blocks are its slots' blocks; chunk sizes other than kChunk; both
// table sizes (4 KB and the 32 KB kLargeArgs); mta::fits_one_table agrees with the
// packing; the table capacities and launch counts for Adam-sized tables (the
// GPT-2-small list, 1,000 small tensors); mta::chunk_for takes whole waves of equal
// chunks.
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <tuple>
#include <vector>

#include "dlopt/multi_tensor_apply.cuh"

using namespace dlopt;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                    \
  do {                                                       \
    if (!(cond)) {                                           \
      if (++failures <= 20) {                                \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);     \
        std::printf(__VA_ARGS__);                            \
        std::printf("\n");                                   \
      }                                                      \
    }                                                        \
  } while (0)

// List 0 (read): the tensor's id; list 1 (read-write): a visit counter; list 2 (write):
// 2 * index + list 0 + 1000 * meta, so a wrong index or a wrong tensor's meta shows.
struct ProbeOp {
  static constexpr int kLists = 3;
  template <int K>
  using List = std::tuple_element_t<K, std::tuple<mta::Access<cuda::F32, mta::kRead>,
                                                  mta::Access<cuda::F32, mta::kReadWrite>,
                                                  mta::Access<cuda::F32, mta::kWrite>>>;
  using Meta = int32_t;
  struct Block {
    int32_t meta;
  };
  DLOPT_HD bool begin(const Meta& m, Block& b) const {
    b.meta = m;
    return true;
  }
  DLOPT_HD void operator()(float (&x)[kLists], const Block& b, int64_t index) const {
    x[1] += 1.f;
    x[2] = 2.f * static_cast<float>(index) + x[0] + 1000.f * static_cast<float>(b.meta);
  }
};

constexpr int kPad = 8;           // guard floats on each side of a tensor
constexpr float kGuard = -7.25f;  // what the guards and untouched outputs hold

struct Buffers {
  std::vector<std::vector<float>> lists[3];
  std::vector<int> offset;  // 0, or 1 float: a pointer off the 16-byte vector alignment
};

template <int BYTES = mta::kSmallArgs>
void check_one(const std::vector<int64_t>& sizes, bool misalign_some, int limit,
               int chunk = mta::kChunk) {
  using Entry = mta::TensorEntry<3, int32_t>;
  using Tab = mta::Table<ProbeOp, BYTES>;
  using Cap = typename Tab::Cap;
  Buffers buf;
  std::vector<Entry> entries;
  for (size_t t = 0; t < sizes.size(); ++t) {
    const int64_t n = sizes[t];
    const int off = misalign_some && t % 3 == 1 ? 1 : 0;
    buf.offset.push_back(off);
    for (int k = 0; k < 3; ++k) {
      buf.lists[k].emplace_back(static_cast<size_t>(n + 2 * kPad + 4), kGuard);
      float* base = buf.lists[k].back().data() + kPad + off;
      for (int64_t i = 0; i < n; ++i) base[i] = k == 0 ? static_cast<float>(t) : k == 1 ? 0.f : kGuard;
    }
    Entry e;
    for (int k = 0; k < 3; ++k) e.ptr[k] = buf.lists[k].back().data() + kPad + off;
    e.numel = n;
    e.meta = static_cast<int32_t>(t % 5);
    entries.push_back(e);
  }
  int tables = 0;
  const mta::CallSize size = mta::call_size(entries, chunk);
  const bool one_table = mta::fits_one_table<BYTES, ProbeOp>(size);
  const cudaError_t err = mta::for_each_table<BYTES>(
      entries, ProbeOp{}, limit, [&](const Tab& tab, int blocks) {
        ++tables;
        EXPECT(blocks >= 1 && blocks <= limit, "table of %d blocks, limit %d", blocks, limit);
        EXPECT(tab.tensors >= 1 && tab.tensors <= Cap::kTensors, "table of %d tensors",
               int(tab.tensors));
        EXPECT(tab.block_end[tab.tensors - 1] == blocks, "slots end at block %d of %d",
               int(tab.block_end[tab.tensors - 1]), blocks);
        EXPECT(tab.chunk == chunk, "table chunk %d, want %d", int(tab.chunk), chunk);
        for (int b = 0; b < blocks; ++b) {
          int slot = -1, c = -1;
          mta::locate(tab, b, slot, c);
          EXPECT(slot >= 0 && slot < tab.tensors && c >= 0 && int64_t(c) * chunk < tab.numel[slot],
                 "block %d: slot %d, chunk %d", b, slot, c);
          for (int th = 0; th < mta::kBlockSize; ++th)
            mta::run_thread(tab, b, th, mta::kBlockSize);
        }
        return cudaSuccess;
      },
      chunk);
  EXPECT(err == cudaSuccess, "for_each_table returned %d", int(err));
  for (size_t t = 0; t < sizes.size(); ++t) {
    const int64_t n = sizes[t];
    const auto& cnt = buf.lists[1][t];
    const auto& out = buf.lists[2][t];
    const int lo = kPad + buf.offset[t];
    for (int64_t i = 0; i < static_cast<int64_t>(cnt.size()); ++i) {
      const bool inside = i >= lo && i < lo + n;
      const int64_t j = i - lo;
      if (inside) {
        const float want = 2.f * j + t + 1000.f * (t % 5);
        EXPECT(cnt[i] == 1.f,
               "tensor %zu (numel %lld) element %lld visited %g times, limit %d, chunk %d", t,
               (long long)n, (long long)j, cnt[i], limit, chunk);
        EXPECT(out[i] == want, "tensor %zu element %lld: %g, want %g", t, (long long)j, out[i],
               want);
      } else {
        EXPECT(cnt[i] == kGuard && out[i] == kGuard, "tensor %zu: guard %lld touched", t,
               (long long)i);
      }
    }
  }
  const int64_t chunks = size.blocks;
  // as few tables as the block limit and the tensor slots allow: a table is launched
  // only when one of them runs out (a tensor cut by the limit takes a slot in both)
  const int64_t by_blocks = (chunks + limit - 1) / limit;
  const int64_t by_slots = (size.tensors + Cap::kTensors - 1) / Cap::kTensors;
  // (a tensor carried over into the next table takes a slot there too)
  const int64_t most = by_blocks + (size.tensors + by_blocks + Cap::kTensors - 1) / Cap::kTensors;
  EXPECT(chunks == 0 ? tables == 0 : tables >= std::max(by_blocks, by_slots) && tables <= most,
         "%d tables for %lld chunks of %lld tensors at limit %d", tables, (long long)chunks,
         (long long)size.tensors, limit);
  // fits_one_table says whether the packing above took (at most) one table, where the
  // block limit is not what cuts it
  if (chunks <= limit)
    EXPECT(one_table == (tables <= 1), "fits_one_table %d but %d tables (%zu tensors, "
           "chunk %d, %d-byte tables)", int(one_table), tables, sizes.size(), chunk, BYTES);
}

// An Op with Adam's table footprint (6 lists, an int32 Meta, 48 bytes of Op: AdamOp's
// size for fp32 without master weights), for counting launches.
struct AdamShapedOp {
  static constexpr int kLists = 6;
  template <int K>
  using List = mta::Access<cuda::F32, mta::kReadWrite>;
  using Meta = int32_t;
  char shared[48];  // optim_adam.cu asserts AdamOp's size
};

// How many launches multi_tensor_apply makes for `sizes` in tables of BYTES on a GPU
// that holds `resident` blocks at once (its chunk_for chunks, no block limit).
template <int BYTES>
int launches_for(const std::vector<int64_t>& sizes, int resident) {
  std::vector<mta::TensorEntry<6, int32_t>> entries;
  int64_t total = 0;
  for (int64_t n : sizes) {
    mta::TensorEntry<6, int32_t> e{};
    e.numel = n;
    e.meta = static_cast<int32_t>(entries.size());
    entries.push_back(e);
    total += n;
  }
  int launches = 0;
  auto count = [&](const auto&, int) {
    ++launches;
    return cudaSuccess;
  };
  mta::for_each_table<BYTES>(entries, AdamShapedOp{}, mta::kMaxBlocks, count,
                             mta::chunk_for(total, resident));
  return launches;
}

}  // namespace

int main() {
  // chunk_for: whole waves of equal chunks when kChunk would leave the GPU part idle
  EXPECT(mta::chunk_for(10000000, 264) == 38912, "10M on 264 slots: %d",
         mta::chunk_for(10000000, 264));
  EXPECT(mta::chunk_for(20000000, 264) == 38912, "20M: two waves");
  EXPECT(mta::chunk_for(1, 264) == mta::kMinChunk, "one element");
  EXPECT(mta::chunk_for(10000000, 0) == mta::kChunk, "unknown occupancy");
  EXPECT(mta::chunk_for(int64_t(264) * mta::kChunk, 264) == mta::kChunk, "a full wave");
  for (int64_t total : {int64_t(1), int64_t(5000), int64_t(1) << 20, int64_t(10000000),
                        int64_t(124000000), int64_t(1) << 36}) {
    for (int resident : {1, 108, 264, 2000}) {
      const int c = mta::chunk_for(total, resident);
      EXPECT(c % mta::kMinChunk == 0 && c >= mta::kMinChunk && c <= mta::kChunk,
             "chunk_for(%lld, %d) = %d", (long long)total, resident, c);
      // never more waves than kChunk chunks would take
      const int64_t wave = int64_t(resident) * mta::kChunk;
      const int64_t blocks = (total + c - 1) / c;
      EXPECT((blocks + resident - 1) / resident <= (total + wave - 1) / wave,
             "chunk_for(%lld, %d) = %d takes more waves", (long long)total, resident, c);
    }
  }

  std::mt19937_64 rng(12345);
  std::uniform_int_distribution<int64_t> small(0, 5000), big(0, 300000);
  const std::vector<std::vector<int64_t>> lists = {
      {1},
      {0, 1, 3, 4, 4097, 65536, 65537, 131077, 278011, 0, 2},
      std::vector<int64_t>(70, 1025),  // more tensors than a table's slots
  };
  std::vector<std::vector<int64_t>> all = lists;
  for (int r = 0; r < 3; ++r) {
    std::vector<int64_t> s;
    for (int i = 0; i < 40; ++i) s.push_back(i % 4 == 0 ? big(rng) : small(rng));
    all.push_back(s);
  }
  for (const auto& sizes : all)
    for (bool mis : {false, true}) {
      for (int limit : {1, 2, 3, 264, 1 << 20}) check_one(sizes, mis, limit);
      for (int chunk : {mta::kMinChunk, 38912}) check_one(sizes, mis, 264, chunk);
    }
  // 32 KB tables (kLargeArgs): hundreds of tensor slots a table
  using LargeCap = mta::Table<ProbeOp, mta::kLargeArgs>::Cap;
  EXPECT(LargeCap::kTensors >= 700 && sizeof(mta::Table<ProbeOp, mta::kLargeArgs>) <= 32764,
         "large table: %d tensors, %zu bytes", LargeCap::kTensors,
         sizeof(mta::Table<ProbeOp, mta::kLargeArgs>));
  EXPECT(sizeof(mta::Table<ProbeOp>) <= 4096, "small table: %zu bytes",
         sizeof(mta::Table<ProbeOp>));
  std::vector<std::vector<int64_t>> large_cases = all;
  large_cases.push_back(std::vector<int64_t>(1000, 1500));  // more slots than a large table
  large_cases.push_back(std::vector<int64_t>(LargeCap::kTensors, 3));  // exactly full
  {
    std::vector<int64_t> s;  // a GPT-2-like mix: a few large tensors, many small ones
    for (int i = 0; i < 150; ++i) s.push_back(i % 6 == 0 ? big(rng) * 3 : small(rng));
    large_cases.push_back(s);
  }
  for (const auto& sizes : large_cases)
    for (bool mis : {false, true})
      for (int limit : {1, 264, 2112, 1 << 20}) check_one<mta::kLargeArgs>(sizes, mis, limit);
  for (int chunk : {mta::kMinChunk, 4}) check_one<mta::kLargeArgs>(large_cases.back(), true, 2112, chunk);

  // Launch counts (docs/architecture.md): the GPT-2-small list (148 tensors, 124M
  // params) and 1,000 tensors of 1K-4K elements on 264 resident blocks (an H100's 132
  // SMs x 2), Adam-sized tables
  static_assert(sizeof(AdamShapedOp) == 48, "Adam's Op size");
  std::vector<int64_t> gpt2 = {50257LL * 768, 1024 * 768, 768, 768};
  for (int layer = 0; layer < 12; ++layer)
    for (int64_t n : {768LL * 2304, 2304LL, 768LL * 768, 768LL, 768LL, 768LL, 768LL * 3072,
                      3072LL, 3072LL * 768, 768LL, 768LL, 768LL})
      gpt2.push_back(n);
  std::vector<int64_t> tiny;
  for (int i = 0; i < 1000; ++i) tiny.push_back(1024 + (i * 2654435761u) % 3072);
  using AdamSmall = mta::Table<AdamShapedOp>::Cap;
  using AdamLarge = mta::Table<AdamShapedOp, mta::kLargeArgs>::Cap;
  EXPECT(AdamSmall::kTensors == 60, "4 KB: %d tensors", AdamSmall::kTensors);
  EXPECT(AdamLarge::kTensors == 498, "32 KB: %d tensors", AdamLarge::kTensors);
  EXPECT(gpt2.size() == 148, "gpt2: %zu tensors", gpt2.size());
  EXPECT(launches_for<mta::kSmallArgs>(gpt2, 264) == 3, "gpt2, 4 KB tables: %d launches",
         launches_for<mta::kSmallArgs>(gpt2, 264));
  EXPECT(launches_for<mta::kLargeArgs>(gpt2, 264) == 1, "gpt2, 32 KB tables: %d launches",
         launches_for<mta::kLargeArgs>(gpt2, 264));
  EXPECT(launches_for<mta::kSmallArgs>(tiny, 264) == 17, "tiny, 4 KB tables: %d launches",
         launches_for<mta::kSmallArgs>(tiny, 264));
  EXPECT(launches_for<mta::kLargeArgs>(tiny, 264) == 3, "tiny, 32 KB tables: %d launches",
         launches_for<mta::kLargeArgs>(tiny, 264));

  // chunks below one vector per thread (DLOPT_CUDA_CHUNK), on the small lists
  for (int chunk : {4, 12, 2044})
    for (bool mis : {false, true})
      for (int limit : {1, 264}) check_one(all[1], mis, limit, chunk);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
