// Multi-LoRA for a group of projections that read the same input (CPU): each row gets its own slot's
// delta, y[t] += scaling * B_s (A_s x[t]), and nothing else is computed.
//
// The PyTorch path multiplies every row by every slot's A and B and masks out the other slots: with 8
// adapters of rank 16 that is ~37% more FLOPs than the base model and 7 extra GEMMs per layer, each with
// ~20 us of fixed cost on a CPU at decode batch sizes. Here one call per group does ~5% of the base
// FLOPs and reads each adapter in the batch once:
//   - rows are grouped by slot into blocks of 8, 4, 2 or 1, so a block shares each load of A and B;
//   - members are walked one at a time and, within one, slot after slot: each member's A and B stacks
//     are read front to back, with software prefetch far enough ahead to cover memory latency (at
//     decode the kernel is bound by reading the adapters: 78 MB a step for 8 SmolLM2 adapters);
//   - B is passed in tiles of 16 output columns (lora/fused.py column_tiles), one contiguous stream;
//   - bf16 on CPUs with AVX512-BF16 multiplies with vdpbf16ps, with h = A x rounded to bf16 as PEFT's
//     bf16 lora_A output is; on CPUs with AVX2 and FMA only, the same layouts and rounding with each bf16
//     widened (exactly) and FMAs; float32 (and bf16 elsewhere) widens to float32 and uses FMAs.
// Each row has its own accumulators and sees the same operations in the same order whatever block it
// is in, so a row's result never depends on its neighbours (tests/test_multi_lora_kernel.py checks it);
// base rows (slot < 0) are not touched at all. Group.start / finish run the same deltas on the helper
// thread while the caller computes the base GEMM (see DeltaJob below). Built by model/kernels.py with
// torch's cpp_extension.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "helper_thread.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include "bf16_avx2.h"

namespace {

// Explicit SIMD through GCC/Clang vector types, and no float reassociation flags for this file (see
// model/kernels.py): every row's sums run in exactly the order written here, whether the row is alone
// or processed in a block with others, so blocking rows for speed cannot change a row's result.
constexpr int W = 16;
// Elements ahead of the current load that each stream asks for, into L2 (hint 2: prefetcht1): 16 KB of
// bf16. Requests for L1 wait for its few miss buffers: on a 2-core Zen 4 a step's deltas from memory (30
// layers, 8 adapters, 2 rows each) took 8.4-11.5 ms with 4 KB ahead into L1, 5.6-6.0 ms like this (huge
// pages both ways); a mixed decode step 1.7% faster (bench/README.md session 15).
constexpr int64_t PREFETCH = 8192;
using vf = float __attribute__((vector_size(4 * W)));
using vu32 = uint32_t __attribute__((vector_size(4 * W)));
using vu16 = uint16_t __attribute__((vector_size(2 * W)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline vf load(const at::BFloat16* p) {
  // bf16 is the top half of a float32: widen the bits.
  vu16 half;
  std::memcpy(&half, p, sizeof half);
  const vu32 wide = __builtin_convertvector(half, vu32) << 16;
  vf v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

// The first n < W elements, zeros after (zero times a finite x adds exactly nothing).
template <typename T>
inline vf load_partial(const T* p, int64_t n) {
  T buf[W] = {};
  std::copy(p, p + n, buf);
  return load(buf);
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

inline void store(at::BFloat16* p, vf v) {
#if defined(__AVX512BF16__)
  // One instruction: round to nearest even (float32 denormals, below 1.2e-38, become zero).
  const __m256bh half = _mm512_cvtneps_pbh(v);
  std::memcpy(p, &half, sizeof half);
#else
  // Round to nearest even, as torch does; NaN stays NaN.
  vu32 u;
  std::memcpy(&u, &v, sizeof u);
  vu32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? vu32{} + 0x7fc0u : r;
  const vu16 half = __builtin_convertvector(r, vu16);
  std::memcpy(p, &half, sizeof half);
#endif
}

template <typename T>
inline void store_partial(T* p, vf v, int64_t n) {
  T buf[W];
  store(buf, v);
  std::copy(buf, buf + n, p);
}

// y[0:w] += delta[0:w] (w <= W) with one rounding, as a GEMM that adds into its output does.
template <typename T>
inline void add_delta(T* y, vf delta, int64_t w) {
  if (w == W) {
    store(y, load(y) + delta);
  } else {
    store_partial(y, load_partial(y, w) + delta, w);
  }
}

// Where a block's deltas go: added into y's rows (rounded once), or, for a deferred add (Group.start /
// finish), stored in float32 as they are, so that adding them later gives y the same bits.
template <typename T>
struct Sink {
  T* const* ys;                  // rows of y at the member's first column
  float* const* ds;              // rows of the float32 delta buffer there, or null: add into y now
  void put(int n, int64_t j, vf acc, int64_t w) const {
    if (ds == nullptr) {
      add_delta(ys[n] + j, acc, w);
    } else if (w == W) {
      store(ds[n] + j, acc);
    } else {
      store_partial(ds[n] + j, acc, w);
    }
  }
};

// Sum of the lanes as a fixed tree.
inline float hsum(vf v) {
  using v8 = float __attribute__((vector_size(32)));
  using v4 = float __attribute__((vector_size(16)));
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Down-projection for NB rows that use the same adapter: h[n][k] = A[k] . x[n]. xs[n] are the rows'
// inputs in float32, zero-padded to a multiple of W. Each row has its own accumulators and sees the
// same sequence of operations for every NB.
template <typename T, int NB>
void down_proj(const float* const* xs, int64_t in, const T* a, int64_t r, float* h) {
  const int64_t full = in / W * W;
  for (int64_t k = 0; k < r; ++k) {
    const T* ak = a + k * in;
    vf acc[NB] = {};
    for (int64_t i = 0; i < full; i += W) {
      __builtin_prefetch(ak + i + PREFETCH, 0, 2);
      const vf av = load(ak + i);
      for (int n = 0; n < NB; ++n) acc[n] += load(xs[n] + i) * av;
    }
    if (full < in) {
      const vf av = load_partial(ak + full, in - full);
      for (int n = 0; n < NB; ++n) acc[n] += load(xs[n] + full) * av;
    }
    for (int n = 0; n < NB; ++n) h[n * r + k] = hsum(acc[n]);
  }
}

#if defined(__AVX512BF16__) && !defined(NO_DOT)
// bf16 inputs on CPUs with AVX512-BF16: vdpbf16ps multiplies pairs of bf16 (exactly) and adds them into
// float32 lanes, reading x and A as they are (no widening). xs[n] point at the rows of x itself.
//
// One accumulator chain per (row, rank) in the down-projection and per (row, tile) in the up-projection;
// several chains run side by side (KB ranks or tiles at once) because a lone chain waits on the latency
// of each vdpbf16ps. Every chain sees the same operations in the same order however many run beside
// it, so grouping never changes a row's result.
constexpr int chains(int nb) { return nb >= 8 ? 2 : 8 / nb; }
constexpr int down_chains(int nb) { return chains(nb); }

// h for ranks k0..k0+KB-1, written as bf16 (rounded, as PEFT's bf16 lora_A output is) at
// hb[n * 2 * ceil(r / 2) + k]: the up-projection reads them in pairs.
template <int NB, int KB>
void down_ranks(const at::BFloat16* const* xs, int64_t in, const at::BFloat16* a, int64_t k0, int64_t pairs,
                uint16_t* hb) {
  constexpr int64_t P = 2 * W;                       // bf16 elements per vector
  const int64_t full = in / P * P;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (in - full)) - 1);
  __m512 acc[NB][KB];
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < KB; ++q) acc[n][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < full; i += P) {
    __m512bh av[KB];
    for (int q = 0; q < KB; ++q) {
      __builtin_prefetch(a + (k0 + q) * in + i + PREFETCH, 0, 2);
      av[q] = (__m512bh)_mm512_loadu_si512(a + (k0 + q) * in + i);
    }
    for (int n = 0; n < NB; ++n) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[n] + i);
      for (int q = 0; q < KB; ++q) acc[n][q] = _mm512_dpbf16_ps(acc[n][q], xv, av[q]);
    }
  }
  if (full < in) {
    for (int n = 0; n < NB; ++n) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xs[n] + full);
      for (int q = 0; q < KB; ++q)
        acc[n][q] = _mm512_dpbf16_ps(acc[n][q], xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, a + (k0 + q) * in + full));
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < KB; ++q) {
      hb[n * pairs * 2 + k0 + q] = at::BFloat16(hsum(acc[n][q])).x;   // __m512 is a vf: no copy
    }
}

// Up-projection for tiles t0..t0+TB-1 with vdpbf16ps: h comes as bf16 pairs and each tile holds B in
// pairs of rows, [ceil(r / 2), W, 2] (an odd rank's last pair padded with zeros), so one instruction
// adds two ranks' products.
template <int NB, int TB>
void up_tiles(const char* hp, const at::BFloat16* bt, int64_t pairs, int64_t out, int64_t t0,
              const Sink<at::BFloat16>& sink) {
  __m512 acc[NB][TB];
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < TB; ++q) acc[n][q] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[TB];
    for (int q = 0; q < TB; ++q) {
      const at::BFloat16* bq = bt + ((t0 + q) * pairs + p) * 2 * W;
      __builtin_prefetch(bq + PREFETCH, 0, 2);
      bv[q] = (__m512bh)_mm512_loadu_si512(bq);
    }
    for (int n = 0; n < NB; ++n) {
      int32_t pair;
      std::memcpy(&pair, hp + (n * pairs + p) * 4, 4);
      const __m512bh hv = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < TB; ++q) acc[n][q] = _mm512_dpbf16_ps(acc[n][q], hv, bv[q]);
    }
  }
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < TB; ++q) {
      const int64_t j = (t0 + q) * W;
      sink.put(n, j, acc[n][q], std::min<int64_t>(W, out - j));
    }
}

template <int NB>
void up_proj(const float* h, const at::BFloat16* bt, int64_t r, int64_t out, const Sink<at::BFloat16>& sink) {
  constexpr int TB = chains(NB);
  const int64_t pairs = (r + 1) / 2, tiles = (out + W - 1) / W;
  const char* hp = reinterpret_cast<const char*>(h);  // the down-projection's bf16 pairs
  int64_t t = 0;
  for (; t + TB <= tiles; t += TB) up_tiles<NB, TB>(hp, bt, pairs, out, t, sink);
  for (; t < tiles; ++t) up_tiles<NB, 1>(hp, bt, pairs, out, t, sink);
}
constexpr bool kBf16Dot = true;
constexpr bool kDotWidensX = false;   // vdpbf16ps reads x's bf16 as they are
using DotX = at::BFloat16;
using DotH = uint16_t;
#elif defined(__AVX2__) && defined(__FMA__) && !defined(NO_DOT)
// bf16 on CPUs with AVX2 and FMA but no AVX512-BF16 (AMD Zen 2/3, older Intel): the B layout and h's
// rounding to bf16 of the path above, 8 float32 lanes at a time. A 32-byte load of bf16 holds 16 values;
// its even ones shifted up and its odd ones masked are those values in float32 (exactly: bf16 is the top
// half of a float32), two integer operations for 16 values, and each product is one FMA (a bf16 product
// is exact in float32: each step rounds once). x is widened once per call, in the order those loads
// pair it with A (widen_row below), and h is kept as float32 (rounded to bf16 first) for the up-projection's
// broadcasts, so no operand is widened more than once. (The generic path below widens through 64-byte
// vectors that AVX2 compilers spill to the stack: 8 SmolLM2 adapters took ~45 ms a step there. Widening
// A and x per use, 8 values at a time, took ~10% longer a mixed step than this, bench/README.md.)
constexpr int down_chains(int nb) { return nb >= 8 ? 1 : 8 / nb; }   // 8 accumulator chains, 11 of 16 ymm
constexpr int up_halves(int nb) { return nb >= 8 ? 1 : nb >= 4 ? 2 : nb >= 2 ? 4 : 8; }   // 8 accumulators
constexpr bool kDotWidensX = true;
using DotX = float;
using DotH = float;

inline const uint16_t* bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

inline float hsum8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// A bf16 row widened for down_ranks: each 16 values as their 8 even then their 8 odd ones, zero-padded
// to a multiple of 16 (dst holds that many).
inline void widen_row(const at::BFloat16* row, int64_t in, float* dst) {
  for (int64_t i = 0; i < in; i += 16) {
    uint16_t buf[16] = {};
    const uint16_t* src = bits(row + i);
    if (in - i < 16) {
      std::memcpy(buf, src, (in - i) * sizeof(uint16_t));
      src = buf;
    }
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    _mm256_storeu_ps(dst + i, loraserve::pair_even(v));
    _mm256_storeu_ps(dst + i + 8, loraserve::pair_odd(v));
  }
}

// h for ranks k0..k0+KB-1 (rounded to bf16, kept in float32) at h[n * 2 * ceil(r / 2) + k]: lane j of
// each chain adds x[16c + 2j] A[16c + 2j], then x[16c + 2j + 1] A[16c + 2j + 1], for c = 0, 1, ...; the
// lanes are summed as a fixed tree. xs[n]: row n as widen_row below widens it.
template <int NB, int KB>
void down_ranks(const float* const* xs, int64_t in, const at::BFloat16* a, int64_t k0, int64_t pairs, float* h) {
  __m256 acc[NB][KB];
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < KB; ++q) acc[n][q] = _mm256_setzero_ps();
  // 16 inputs at i of ranks k0.. (rows of a, `stride` apart), against the split rows of x.
  auto chunk = [&](const uint16_t* ak, int64_t stride, int64_t i) {
    for (int q = 0; q < KB; ++q) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ak + q * stride));
      const __m256 even = loraserve::pair_even(v);
      for (int n = 0; n < NB; ++n) acc[n][q] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[n] + i), even, acc[n][q]);
      const __m256 odd = loraserve::pair_odd(v);
      for (int n = 0; n < NB; ++n) acc[n][q] = _mm256_fmadd_ps(_mm256_loadu_ps(xs[n] + i + 8), odd, acc[n][q]);
    }
  };
  const uint16_t* ak = bits(a + k0 * in);
  const int64_t full = in / 16 * 16;
  for (int64_t i = 0; i < full; i += 16) {
    if (i % 32 == 0)                                          // one request per cache line and row
      for (int q = 0; q < KB; ++q) __builtin_prefetch(ak + q * in + i + PREFETCH, 0, 2);
    chunk(ak + i, in, i);
  }
  if (full < in) {                                            // the last in % 16 inputs, zero-padded
    uint16_t tail[KB][16] = {};
    for (int q = 0; q < KB; ++q) std::memcpy(tail[q], ak + q * in + full, (in - full) * sizeof(uint16_t));
    chunk(tail[0], 16, full);
  }
#pragma GCC unroll 8     // as in up_halves_of: no copy of acc on the stack
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int q = 0; q < KB; ++q)
      h[n * pairs * 2 + k0 + q] = static_cast<float>(at::BFloat16(hsum8(acc[n][q])));
}

// 8 columns of a row's delta (w of them real): into y with one rounding, or kept in float32 (deferred).
inline void put8(const Sink<at::BFloat16>& sink, int n, int64_t j, __m256 acc, int64_t w) {
  if (sink.ds == nullptr) {
    uint16_t* y = reinterpret_cast<uint16_t*>(sink.ys[n] + j);
    const __m256 old = w == 8 ? loraserve::widen8(y) : loraserve::widen8_partial(y, w);
    loraserve::store8_bf16(y, _mm256_add_ps(old, acc), w);
  } else if (w == 8) {
    _mm256_storeu_ps(sink.ds[n] + j, acc);
  } else {
    float buf[8];
    _mm256_storeu_ps(buf, acc);
    std::copy(buf, buf + w, sink.ds[n] + j);
  }
}

// y[0:n] += d[0:n] with one rounding, 8 columns at a time as put8 adds them (the generic add_row's
// 16-lane vectors would spill here): Group.finish's deferred deltas.
inline void add_row(at::BFloat16* y, const float* d, int64_t n) {
  const Sink<at::BFloat16> sink{&y, nullptr};
  for (int64_t j = 0; j < n; j += 8) {
    const int64_t w = std::min<int64_t>(8, n - j);
    float part[8] = {};
    if (w < 8) std::copy(d + j, d + j + w, part);
    put8(sink, 0, j, _mm256_loadu_ps(w == 8 ? d + j : part), w);
  }
}

// Up-projection for the half tiles (8 columns) h0..h0+HB-1: a tile's pairs hold its 16 columns as
// (k even, k odd) in each 32-bit lane, the first 8 columns in the first 32 bytes. Each accumulator adds,
// pair by pair, h[2p] B[2p] then h[2p + 1] B[2p + 1], as vdpbf16ps does.
template <int NB, int HB>
void up_halves_of(const float* h, const at::BFloat16* bt, int64_t pairs, int64_t out, int64_t h0,
                  const Sink<at::BFloat16>& sink) {
  __m256 acc[NB][HB];
  for (int n = 0; n < NB; ++n)
    for (int q = 0; q < HB; ++q) acc[n][q] = _mm256_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int q = 0; q < HB; ++q) {
      const int64_t half = h0 + q;
      const at::BFloat16* bq = bt + ((half / 2) * pairs + p) * 2 * W + (half % 2) * W;
      if (half % 2 == 0) __builtin_prefetch(bq + PREFETCH, 0, 2);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq));
      const __m256 even = loraserve::pair_even(v);
      for (int n = 0; n < NB; ++n)
        acc[n][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(h + n * pairs * 2 + 2 * p), even, acc[n][q]);
      const __m256 odd = loraserve::pair_odd(v);
      for (int n = 0; n < NB; ++n)
        acc[n][q] = _mm256_fmadd_ps(_mm256_broadcast_ss(h + n * pairs * 2 + 2 * p + 1), odd, acc[n][q]);
    }
  }
#pragma GCC unroll 8     // with every acc index a constant, no copy of acc is kept on the stack
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int q = 0; q < HB; ++q) {
      const int64_t j = (h0 + q) * 8;
      put8(sink, n, j, acc[n][q], std::min<int64_t>(8, out - j));
    }
}

template <int NB>
void up_proj(const float* h, const at::BFloat16* bt, int64_t r, int64_t out, const Sink<at::BFloat16>& sink) {
  constexpr int HB = up_halves(NB);
  const int64_t pairs = (r + 1) / 2, halves = (out + 7) / 8;
  int64_t q = 0;
  for (; q + HB <= halves; q += HB) up_halves_of<NB, HB>(h, bt, pairs, out, q, sink);
  for (; q < halves; ++q) up_halves_of<NB, 1>(h, bt, pairs, out, q, sink);
}
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
constexpr bool kDotWidensX = true;    // unused: no bf16 dot path
#endif

#if (defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))) && !defined(NO_DOT)
// h = A x for NB rows of one adapter, ranks in pairs (h[n * 2 * ceil(r / 2) + k]: bf16 bits, or float32
// on the AVX2 path), down_chains(NB) ranks at a time: the up-projection reads them in pairs.
template <int NB>
void down_proj(const DotX* const* xs, int64_t in, const at::BFloat16* a, int64_t r, float* h) {
  constexpr int KB = down_chains(NB);
  const int64_t pairs = (r + 1) / 2;
  DotH* hb = reinterpret_cast<DotH*>(h);
  int64_t k = 0;
  for (; k + KB <= r; k += KB) down_ranks<NB, KB>(xs, in, a, k, pairs, hb);
  for (; k < r; ++k) down_ranks<NB, 1>(xs, in, a, k, pairs, hb);
  if (r % 2)
    for (int n = 0; n < NB; ++n) hb[n * pairs * 2 + r] = 0;   // the odd rank's missing partner
}
#endif

// Up-projection for the same rows: y[n] += Bt^T h[n], W output columns at a time, rounded once.
template <typename T, int NB>
void up_proj(const float* h, const T* bt, int64_t r, int64_t out, const Sink<T>& sink) {
  const int64_t tiles = (out + W - 1) / W;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t j = tile * W, w = std::min<int64_t>(W, out - j);
    const T* bj = bt + tile * r * W;                 // this tile's [r, W] block, contiguous
    vf acc[NB] = {};
    for (int64_t k = 0; k < r; ++k) {
      __builtin_prefetch(bj + k * W + PREFETCH, 0, 2);
      const vf bv = load(bj + k * W);
      for (int n = 0; n < NB; ++n) acc[n] += h[n * r + k] * bv;
    }
    for (int n = 0; n < NB; ++n) sink.put(n, j, acc[n], w);
  }
}

// Whether T's deltas run on this CPU's bf16 dot-product path (above) rather than the generic one.
template <typename T>
constexpr bool kDot = kBf16Dot && std::is_same_v<T, at::BFloat16>;

// One member's delta for a block of NB rows. X is float (inputs widened: widen_row) or T itself (vdpbf16ps).
template <typename T, typename X, int NB>
void block_delta(const X* const* xs, int64_t in, const T* a, const T* bt, int64_t r, int64_t out,
                 const Sink<T>& sink, float* h) {
  if constexpr (kDot<T>) {
    down_proj<NB>(xs, in, a, r, h);
    up_proj<NB>(h, bt, r, out, sink);
  } else {
    down_proj<T, NB>(xs, in, a, r, h);
    up_proj<T, NB>(h, bt, r, out, sink);
  }
}

// Whether the kernel reads T rows of x as they are (vdpbf16ps) rather than widened to float32.
template <typename T>
constexpr bool kReadsX = kDot<T> && !kDotWidensX;

// Row `row` of x widened for the generic path into dst, in order (in rounded up to W floats, the rest
// zero). The AVX2 bf16 path has its own overload above, in the order its loads of A pair with x.
template <typename T>
void widen_row(const T* row, int64_t in, float* dst) {
  const int64_t in_pad = (in + W - 1) / W * W;
  for (int64_t i = 0; i < in; ++i) dst[i] = static_cast<float>(row[i]);
  std::fill(dst + in, dst + in_pad, 0.f);
}

template <typename T, typename X>
void block_delta_any(int nb, const X* const* xs, int64_t in, const T* a, const T* bt, int64_t r,
                     int64_t out, const Sink<T>& sink, float* h) {
  switch (nb) {
    case 8: return block_delta<T, X, 8>(xs, in, a, bt, r, out, sink, h);
    case 4: return block_delta<T, X, 4>(xs, in, a, bt, r, out, sink, h);
    case 2: return block_delta<T, X, 2>(xs, in, a, bt, r, out, sink, h);
    default: return block_delta<T, X, 1>(xs, in, a, bt, r, out, sink, h);
  }
}

// Buffers reused from call to call only ever grow: std::vector zero-fills whatever it grows by, and the
// groups of a layer alternate between sizes (a decode step's delta buffer went 16 x 576 -> 16 x 3072
// floats and back in every layer: ~5 MB of memset a step).
template <typename V>
void at_least(V& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
}

struct Block {
  int64_t slot;
  int nb;                      // 1, 2, 4 or 8 rows of that slot
  int64_t rows[8];
};

// Rows grouped by slot, in blocks of 8, 4, 2 and 1 (base rows left out). The buffers are reused from
// call to call: small allocations on every call would cut up the large free chunks the next step's
// activations need, and glibc would grow the heap (page faults) instead of reusing them.
const std::vector<Block>& make_blocks(const int64_t* slots, int64_t n_rows, int64_t num_slots) {
  static thread_local std::vector<int64_t> start, order;
  static thread_local std::vector<Block> blocks;
  start.assign(num_slots + 1, 0);
  for (int64_t t = 0; t < n_rows; ++t)
    if (slots[t] >= 0) ++start[slots[t] + 1];
  for (int64_t s = 0; s < num_slots; ++s) start[s + 1] += start[s];
  order.resize(start[num_slots]);
  std::vector<int64_t>& next = start;                // counting sort, rows in order within each slot
  for (int64_t t = 0; t < n_rows; ++t)
    if (slots[t] >= 0) order[next[slots[t]]++] = t;  // leaves next[s] at the end of slot s
  blocks.clear();
  int64_t i = 0;
  for (int64_t s = 0; s < num_slots; ++s) {
    while (i < next[s]) {
      int nb = 8;
      while (nb > next[s] - i) nb /= 2;
      Block blk{s, nb, {}};
      std::copy(order.begin() + i, order.begin() + i + nb, blk.rows);
      blocks.push_back(blk);
      i += nb;
    }
  }
  return blocks;
}

// One member of a group as the kernels read it: raw pointers and sizes, taken from its tensors once. The
// calls of a forward then read these few cache lines instead of each tensor's metadata (TensorImpl,
// storage, sizes), which are cold by then: the GEMMs stream megabytes between two calls, and in a decode
// step with 8 adapters those misses cost ~1.5 us a call to start the deltas, 120 calls a step.
struct Member {
  const void* a;              // [L, r, in]
  const void* bt;             // the B tiles: one slot every bt_slot elements
  int64_t r, bt_slot, col, out;
};

// Member m's delta for one block of rows, the inputs as they are (xr: vdpbf16ps) or widened to float32
// (xs: widen_row), into the sink. Shared by the in-place apply and the deferred chunks.
template <typename T>
void member_block(const Block& blk, const T* const* xr, const float* const* xs, int64_t in, const Member& m,
                  const Sink<T>& sink, float* h) {
  const T* ag = static_cast<const T*>(m.a) + blk.slot * m.r * in;
  const T* bg = static_cast<const T*>(m.bt) + blk.slot * m.bt_slot;
  if constexpr (kReadsX<T>) {
    block_delta_any<T, T>(blk.nb, xr, in, ag, bg, m.r, m.out, sink, h);
  } else {
    block_delta_any<T, float>(blk.nb, xs, in, ag, bg, m.r, m.out, sink, h);
  }
}

int64_t max_rank(const std::vector<Member>& members) {
  int64_t rank = 0;
  for (const Member& m : members) rank = std::max(rank, m.r);
  return rank;
}

// Runs of blocks the in-place apply shares with the helper thread (helper_thread.h parallel_runs).
constexpr int64_t kApplyRuns = 4;

// The deltas of `blocks` added into y (yp, row stride y_stride), the blocks split over torch's threads, or
// with one torch thread and the helper on (set_helper), shared with the helper.
template <typename T>
void apply_blocks(const T* xp, int64_t in, const std::vector<Block>& blocks, const std::vector<Member>& members,
                  T* yp, int64_t y_stride) {
  const int64_t in_pad = (in + W - 1) / W * W, rank = max_rank(members);
  auto run = [&](int64_t begin, int64_t end) {
    // Widened inputs of this range's rows (unless read as they are), 8 rows per block.
    static thread_local std::vector<float> xf, h;      // reused: see make_blocks
    at_least(xf, kReadsX<T> ? 0 : (end - begin) * 8 * in_pad);
    at_least(h, 8 * (rank + 1));                     // an odd rank's h has a zero partner
    if constexpr (!kReadsX<T>) {
      for (int64_t b = begin; b < end; ++b)
        for (int n = 0; n < blocks[b].nb; ++n)
          widen_row(xp + blocks[b].rows[n] * in, in, xf.data() + ((b - begin) * 8 + n) * in_pad);
    }
    const float* xs[8];
    const T* xr[8];
    T* ys[8];
    const Sink<T> sink{ys, nullptr};
    // Member by member, then slot by slot: each member's A and B stacks are read front to back, one
    // stream the hardware prefetcher follows (the order cannot change any row's result).
    for (const Member& m : members) {
      for (int64_t b = begin; b < end; ++b) {
        const Block& blk = blocks[b];
        for (int n = 0; n < blk.nb; ++n) {
          xr[n] = xp + blk.rows[n] * in;
          xs[n] = xf.data() + ((b - begin) * 8 + n) * in_pad;
          ys[n] = yp + blk.rows[n] * y_stride + m.col;
        }
        member_block(blk, xr, xs, in, m, sink, h.data());
      }
    }
  };
  loraserve::parallel_runs(static_cast<int64_t>(blocks.size()), kApplyRuns, run);
}

// Member m's deltas for one block of rows into the float32 buffer dp (row stride d_stride): one chunk of a
// deferred job (Group.start), run by whichever thread takes it.
template <typename T>
void block_chunk(const T* xp, int64_t in, const Block& blk, const Member& m, float* dp, int64_t d_stride) {
  const int64_t in_pad = (in + W - 1) / W * W;
  static thread_local std::vector<float> xf, h;          // reused: see make_blocks
  at_least(xf, kReadsX<T> ? 0 : 8 * in_pad);
  at_least(h, 8 * (m.r + 1));
  const float* xs[8];
  const T* xr[8];
  float* ds[8];
  for (int n = 0; n < blk.nb; ++n) {
    xr[n] = xp + blk.rows[n] * in;
    xs[n] = xf.data() + n * in_pad;
    ds[n] = dp + blk.rows[n] * d_stride + m.col;
    if constexpr (!kReadsX<T>) widen_row(xr[n], in, xf.data() + n * in_pad);
  }
  member_block(blk, xr, xs, in, m, Sink<T>{nullptr, ds}, h.data());
}

// Whether B tiles for tensors of this dtype hold pairs of rows (bf16 on CPUs with AVX512-BF16).
bool b_pairs_for(at::ScalarType dtype) { return kBf16Dot && dtype == at::kBFloat16; }
bool b_pairs(const at::Tensor& like) { return b_pairs_for(like.scalar_type()); }

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [T, in] tensor");
}

void check_y(const at::Tensor& x, const at::Tensor& y) {
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.stride(1) == 1 && y.scalar_type() == x.scalar_type() &&
              y.device().is_cpu(), "y must be a CPU [T, out] tensor with unit column stride and x's dtype");
}

void check_token_slots(const at::Tensor& token_slots, int64_t rows) {
  TORCH_CHECK(token_slots.dim() == 1 && token_slots.size(0) == rows && token_slots.is_contiguous() &&
              token_slots.scalar_type() == at::kLong && token_slots.device().is_cpu(),
              "token_slots must be a contiguous int64 CPU [T] tensor");
}

// Every token's slot is one the members have (base rows: -1).
void check_slots_in_range(const at::Tensor& token_slots, int64_t num_slots) {
  const int64_t* slots = token_slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < token_slots.size(0); ++t)
    TORCH_CHECK(slots[t] < num_slots, "token ", t, " has slot ", slots[t], " of ", num_slots);
}

// a[g] [L, r_g, in]; b[g] [L, ceil(out_g / 16), r_g, 16] (or [L, ceil(out_g / 16), ceil(r_g / 2), 16, 2]
// where b_pairs): the scaled B^T in tiles of 16 output columns, zero-padded, so the up-projection reads one
// contiguous stream; member g's columns of y are cols[g] .. cols[g] + outs[g] - 1. Checked against inputs
// of `in` features in `dtype`; returns the members as the kernels read them.
std::vector<Member> checked_members(int64_t in, at::ScalarType dtype, const std::vector<at::Tensor>& a,
                                    const std::vector<at::Tensor>& b, const std::vector<int64_t>& cols,
                                    const std::vector<int64_t>& outs) {
  TORCH_CHECK(a.size() == b.size() && a.size() == cols.size() && a.size() == outs.size(),
              "a, b, cols and outs need one entry per member");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "multi_lora_apply supports float32 and bfloat16");
  const bool pairs = b_pairs_for(dtype);
  std::vector<Member> members;
  for (size_t g = 0; g < a.size(); ++g) {
    TORCH_CHECK(a[g].dim() == 3 && a[g].is_contiguous() && a[g].size(2) == in && a[g].device().is_cpu() &&
                a[g].scalar_type() == dtype, "a[", g, "] must be contiguous CPU [L, r, in] in x's dtype");
    const int64_t r = a[g].size(1), tiles = (outs[g] + W - 1) / W;
    const bool ok = pairs ? b[g].dim() == 5 && b[g].size(2) == (r + 1) / 2 && b[g].size(3) == W && b[g].size(4) == 2
                          : b[g].dim() == 4 && b[g].size(2) == r && b[g].size(3) == W;
    TORCH_CHECK(ok && b[g].is_contiguous() && b[g].size(0) == a[g].size(0) && b[g].size(1) == tiles &&
                b[g].device().is_cpu() && b[g].scalar_type() == dtype, "b[", g, "] must be contiguous CPU ",
                pairs ? "[L, ceil(out / 16), ceil(r / 2), 16, 2]" : "[L, ceil(out / 16), r, 16]", " matching a[", g, "]");
    TORCH_CHECK(cols[g] >= 0 && outs[g] >= 0, "member ", g, " has a negative column or width");
    members.push_back({a[g].data_ptr(), b[g].data_ptr(), r, b[g].stride(0), cols[g], outs[g]});
  }
  return members;
}

// The slots every member has (-1 for no members): the fewest of any member's A or B.
int64_t common_slots(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  int64_t num_slots = -1;
  for (size_t g = 0; g < a.size() && g < b.size(); ++g) {
    const int64_t have = std::min(a[g].size(0), b[g].size(0));
    num_slots = num_slots < 0 ? have : std::min(num_slots, have);
  }
  return num_slots;
}

// The columns of y the members write: y needs at least this many.
int64_t columns_used(const std::vector<Member>& members) {
  int64_t used = 0;
  for (const Member& m : members) used = std::max(used, m.col + m.out);
  return used;
}

template <typename T>
void apply_typed(const at::Tensor& x, const at::Tensor& token_slots, int64_t num_slots,
                 const std::vector<Member>& members, at::Tensor& y) {
  const std::vector<Block>& blocks = make_blocks(token_slots.data_ptr<int64_t>(), x.size(0), num_slots);
  apply_blocks<T>(x.data_ptr<T>(), x.size(1), blocks, members, y.data_ptr<T>(), y.stride(0));
}

// y += each row's own delta, everything checked already (multi_lora_apply, Group.apply).
void apply_checked(const at::Tensor& x, const at::Tensor& token_slots, int64_t num_slots,
                   const std::vector<Member>& members, at::Tensor& y) {
  pybind11::gil_scoped_release no_gil;   // pure arithmetic: let the HTTP thread run meanwhile
  if (x.scalar_type() == at::kBFloat16) {
    apply_typed<at::BFloat16>(x, token_slots, num_slots, members, y);
  } else {
    apply_typed<float>(x, token_slots, num_slots, members, y);
  }
}

// y [T, >= cols[g] + outs[g]] += each row's own delta, in place; x [T, in], token_slots [T] int64 (-1: base
// row, untouched); the members as checked_members takes them.
void multi_lora_apply(const at::Tensor& x, const at::Tensor& token_slots, const std::vector<at::Tensor>& a,
                      const std::vector<at::Tensor>& b, at::Tensor y, const std::vector<int64_t>& cols,
                      const std::vector<int64_t>& outs) {
  check_x(x);
  check_y(x, y);
  check_token_slots(token_slots, x.size(0));
  const std::vector<Member> members = checked_members(x.size(1), x.scalar_type(), a, b, cols, outs);
  TORCH_CHECK(columns_used(members) <= y.size(1), "a member overruns y's columns");
  if (members.empty()) return;           // no member has LoRA: nothing to add
  const int64_t num_slots = common_slots(a, b);
  check_slots_in_range(token_slots, num_slots);
  apply_checked(x, token_slots, num_slots, members, y);
}

struct Group;

constexpr int64_t ADD_RUNS = 4;   // Group.finish's adds: runs of row blocks shared with the helper thread

// A deferred job: the deltas run on the helper thread (helper_thread.h) while the caller computes the
// base GEMM. Group.start posts its (member, block) chunks, member by member as apply_blocks reads them;
// Group.finish joins (doing whatever chunks the helper has not reached: it shares its core with the HTTP
// server) and adds the deltas, kept in float32, into y with the one rounding the in-place apply uses:
// the same bits. The deltas are bound by reading the adapters (78 MB a step for 8 SmolLM2 adapters), the
// GEMM by arithmetic, so on two cores the reads cost little time. One job at a time: finish, then start.
// The group and x stay alive from start to finish: the caller (lora/fused.py) holds both.
struct DeltaJob {
  const Group* group = nullptr;  // null: no job; its members, in, dtype and d_cols are the job's
  at::Tensor x_keep;             // x as [T, in]: kept until finish (a copy where x was not contiguous)
  const void* x = nullptr;       // its rows
  int64_t rows = 0;
  std::vector<Block> blocks;
  std::vector<float> delta;      // [T, group->d_cols]
  int64_t chunks = 0;            // (member, block) pairs
  int64_t ticket = -1;           // the helper's, or -1: finish computes every chunk

  static DeltaJob& current() {
    static DeltaJob* job = new DeltaJob();
    return *job;
  }

  static void chunk(void* ctx, int64_t i);
};

// y[0:n] += d[0:n] with one rounding, W columns at a time, as add_delta does in the in-place apply.
template <typename T>
void add_row(T* y, const float* d, int64_t n) {
  for (int64_t j = 0; j < n; j += W) {
    const int64_t w = std::min<int64_t>(W, n - j);
    add_delta(y + j, w == W ? load(d + j) : load_partial(d + j, w), w);
  }
}

// y's rows of the job's blocks += their deltas, member by member, each value rounded once (add_row), as the
// in-place apply adds them.
template <typename T>
void add_deltas(const DeltaJob& job, const std::vector<Member>& members, int64_t d_cols, T* yp, int64_t y_stride,
                int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const Block& blk = job.blocks[b];
    for (int n = 0; n < blk.nb; ++n) {
      T* y = yp + blk.rows[n] * y_stride;
      const float* d = job.delta.data() + blk.rows[n] * d_cols;
      for (const Member& m : members) add_row(y + m.col, d + m.col, m.out);
    }
  }
}

// One projection group's adapters, bound once per slot change (lora/fused.py): checked here, once, and
// kept as raw pointers (Member), so a forward's calls convert no Python lists (every allocation made
// mid-forward can split the large free chunks that the next activations need, and the heap then grows,
// page fault by page fault) and read no tensor's metadata. x and y may come with the model's leading dims
// ([1, T, in]): flattened here, where a view costs nanoseconds, not in Python (120 calls a step).
struct Group {
  std::vector<at::Tensor> a, b;       // keep the adapters' memory alive
  std::vector<Member> members;
  int64_t in = 0, num_slots = -1, d_cols = 0;
  at::ScalarType dtype = at::kFloat;

  Group(std::vector<at::Tensor> a_in, std::vector<at::Tensor> b_in, const std::vector<int64_t>& cols,
        const std::vector<int64_t>& outs)
      : a(std::move(a_in)), b(std::move(b_in)) {
    if (!a.empty()) {
      in = a[0].dim() == 3 ? a[0].size(2) : -1;
      dtype = a[0].scalar_type();
    }
    members = checked_members(in, dtype, a, b, cols, outs);
    num_slots = common_slots(a, b);
    d_cols = columns_used(members);
  }

  // x [..., in] as [T, in], checked against the members, and token_slots against x.
  at::Tensor rows_of(const at::Tensor& x, const at::Tensor& token_slots) const {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
    check_x(x2);
    check_token_slots(token_slots, x2.size(0));
    if (!members.empty()) {
      TORCH_CHECK(x2.size(1) == in && x2.scalar_type() == dtype, "x [T, ", x2.size(1), "] ", x2.scalar_type(),
                  " does not match the group's adapters ([L, r, ", in, "] ", dtype, ")");
      check_slots_in_range(token_slots, num_slots);
    }
    return x2;
  }

  void apply(const at::Tensor& x, const at::Tensor& token_slots, const at::Tensor& y) const {
    TORCH_CHECK(x.dim() >= 2 && y.dim() == x.dim(), "x and y must be [..., in] and [..., out]");
    const at::Tensor x2 = rows_of(x, token_slots);
    at::Tensor y2 = y.view({-1, y.size(-1)});
    check_y(x2, y2);
    TORCH_CHECK(d_cols <= y2.size(1), "a member overruns y's columns");
    if (!members.empty()) apply_checked(x2, token_slots, num_slots, members, y2);
  }

  // The deltas for x's rows start on the helper thread; `finish(y)` adds them. False (nothing started)
  // when no member has LoRA.
  bool start(const at::Tensor& x, const at::Tensor& token_slots, const Group* next, const Group* after) const {
    TORCH_CHECK(x.dim() >= 2, "x must be [..., in]");
    const at::Tensor x2 = rows_of(x, token_slots);
    if (members.empty()) return false;
    DeltaJob& job = DeltaJob::current();
    TORCH_CHECK(job.group == nullptr, "a multi-LoRA job is already running: finish it first");
    job.group = this;
    job.x_keep = x2;
    job.x = x2.data_ptr();
    job.rows = x2.size(0);
    job.blocks = make_blocks(token_slots.data_ptr<int64_t>(), job.rows, num_slots);
    at_least(job.delta, job.rows * d_cols);
    job.chunks = static_cast<int64_t>(job.blocks.size() * members.size());
    // No free slot on the helper (another thread's jobs hold them all): finish computes the deltas itself.
    job.ticket = loraserve::helper().post(job.chunks, &DeltaJob::chunk, &job);
    // The groups the forward runs next and after it will read their adapters for the same slots: the
    // helper prefetches them once it is done with this job and the GEMM, while this thread runs Python and
    // small ops (helper_thread.h). 8 SmolLM2 adapters on a 2-core Zen 3, the next group: a decode step's
    // deltas 8.1 -> 3.8-4.5 ms of the helper's time, the step ~2 ms shorter. The one after it too (a
    // 2-core Zen 4): the gaps between two groups are too short to bring in the next group's adapters
    // alone (gate/up's are 1 MB), the idle helper goes on with the group after it: the step 1% faster.
    static thread_local std::vector<loraserve::ReadRange> ranges;
    ranges.clear();
    for (const Group* g : {next, after})
      if (g != nullptr) g->read_ahead_ranges(job.blocks, ranges);
    loraserve::helper().plan_read_ahead(ranges.data(), static_cast<int64_t>(ranges.size()));
    return true;
  }

  // The adapters this group's deltas will read for `blocks`' slots, appended to `ranges`: for the helper
  // thread to bring into the cache while it waits (helper_thread.h plan_read_ahead). Member by member, the
  // slots' A, then their B: consecutive slots lie side by side in both stacks, so the ranges coalesce (8
  // adapters: 6 ranges for q/k/v, not 48), and fewer of the plan's cache lines, which the helper reads
  // while this thread writes them, move between the cores.
  void read_ahead_ranges(const std::vector<Block>& blocks, std::vector<loraserve::ReadRange>& ranges) const {
    auto add = [&ranges](const char* p, int64_t bytes) {
      if (!ranges.empty() && ranges.back().p + ranges.back().bytes == p) {
        ranges.back().bytes += bytes;
      } else {
        ranges.push_back({p, bytes});
      }
    };
    const int64_t elem = dtype == at::kBFloat16 ? 2 : 4;
    for (const Member& m : members) {
      for (int half = 0; half < 2; ++half) {
        const int64_t bytes = (half == 0 ? m.r * in : m.bt_slot) * elem;
        const char* base = static_cast<const char*>(half == 0 ? m.a : m.bt);
        for (size_t i = 0; i < blocks.size(); ++i) {
          const int64_t slot = blocks[i].slot;
          if (slot >= num_slots || (i > 0 && blocks[i - 1].slot == slot)) continue;   // once a slot (sorted)
          add(base + slot * bytes, bytes);
        }
      }
    }
  }

  void finish(const at::Tensor& y) const {
    DeltaJob& job = DeltaJob::current();
    TORCH_CHECK(job.group != nullptr, "finish without start");
    bool ok;
    {
      pybind11::gil_scoped_release no_gil;
      if (job.ticket >= 0) {
        loraserve::helper().join(job.ticket);
      } else {
        for (int64_t i = 0; i < job.chunks; ++i) DeltaJob::chunk(&job, i);
      }
      const Group& g = *job.group;
      const at::Tensor y2 = y.view({-1, y.size(-1)});
      ok = y2.size(0) == job.rows && y2.size(1) >= g.d_cols && y2.stride(1) == 1 && y2.scalar_type() == g.dtype &&
           y2.device().is_cpu();
      // The blocks' adds are shared with the helper too (each block's rows by one thread: the same bits):
      // it computed most of the deltas, so its share reads them from its own cache. A mixed decode step
      // 1.002-1.033 faster in five alternated runs (bench/README.md session 16).
      const auto blocks = static_cast<int64_t>(job.blocks.size());
      if (ok && g.dtype == at::kBFloat16) {
        auto* yp = y2.data_ptr<at::BFloat16>();
        loraserve::helper_runs(blocks, ADD_RUNS, [&](int64_t b0, int64_t b1) {
          add_deltas<at::BFloat16>(job, g.members, g.d_cols, yp, y2.stride(0), b0, b1);
        });
      } else if (ok) {
        auto* yp = y2.data_ptr<float>();
        loraserve::helper_runs(blocks, ADD_RUNS, [&](int64_t b0, int64_t b1) {
          add_deltas<float>(job, g.members, g.d_cols, yp, y2.stride(0), b0, b1);
        });
      }
    }
    job.group = nullptr;                               // the job is over, whatever y was
    job.x_keep = at::Tensor();
    TORCH_CHECK(ok, "finish: y must be a CPU [T, out] tensor with unit column stride, x's rows and dtype");
  }
};

void DeltaJob::chunk(void* ctx, int64_t i) {
  DeltaJob& j = *static_cast<DeltaJob*>(ctx);
  const Group& g = *j.group;
  const auto nb = static_cast<int64_t>(j.blocks.size());
  const Member& m = g.members[static_cast<size_t>(i / nb)];
  if (g.dtype == at::kBFloat16) {
    block_chunk<at::BFloat16>(static_cast<const at::BFloat16*>(j.x), g.in, j.blocks[i % nb], m, j.delta.data(), g.d_cols);
  } else {
    block_chunk<float>(static_cast<const float*>(j.x), g.in, j.blocks[i % nb], m, j.delta.data(), g.d_cols);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Group>(m, "Group")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>>(),
           "a, b, cols, outs as multi_lora_apply takes them")
      .def("apply", &Group::apply, "multi_lora_apply(x, token_slots, a, b, y, cols, outs) with the bound a, b, cols, outs")
      .def("start", &Group::start, "begin x's deltas on the helper thread; False if no member has LoRA. `next`, `after`: "
           "the groups the forward runs next and after it, whose adapters the helper prefetches once idle",
           py::arg("x"), py::arg("token_slots"), py::arg("next") = nullptr, py::arg("after") = nullptr)
      .def("finish", &Group::finish, "wait for the started deltas and add them into y (same bits as apply)");
  m.def("multi_lora_apply", &multi_lora_apply, "y[t] += B_s A_s x[t] for each row t's own slot s, in place");
  m.def("b_pairs", &b_pairs, "whether B tiles for tensors of this one's dtype hold pairs of rows");
  loraserve::def_helper_sharing(m);
  loraserve::def_set_helper(m, "with one torch thread, share the in-place apply's blocks with the helper thread "
                               "(the same bits)");
}
