// Attention read straight from the paged KV cache (CPU), for every query token of a step.
//
// Each query row attends over its own context: the first lens[i] tokens of the blocks in its table row,
// itself the last of them. A decode is one such row; so is each token of a prompt chunk (the engine gives
// it its sequence's table and its own position + 1), so one call per layer covers a whole mixed step. For
// each (query, KV head) the kernel walks the context's blocks in the [Hkv, slots, D] cache, so no copy of
// the context is gathered first (the PyTorch path gathers K and V with index_select, then multiplies: three
// passes over the context instead of one). Scores, softmax and the weighted sum run in float32 (bf16
// scores on AVX512-BF16 CPUs with vdpbf16ps: exact products, float32 sums); each query is computed on its
// own, so a row's result never depends on what else is in the batch. Built by model/kernels.py with
// torch's cpp_extension.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fast_exp.h"
#include "helper_thread.h"
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

// With one torch thread and the helper on (set_helper: the engine's choice), the helper thread takes runs
// of (query, head) pairs: a batch-16 decode's attention at 96 tokens of context, 30 layers, 4.1 -> 2.0 ms
// (2 to 16 runs alike).
constexpr int64_t RUNS = 4;

// Blocks ahead of the one in use whose lines are requested: the blocks lie anywhere in the cache, and
// one block's arithmetic is too short to cover a miss (2 ahead instead of 1: a batch-16 step's attention
// at 512 tokens of context 25.1 -> 21.5 ms).
constexpr int64_t AHEAD = 2;
// Blocks of K and of V that the next (sequence, head) reads first, requested while the current one
// computes: every pair starts cold at blocks anywhere in the cache, and at short contexts those first
// misses were most of the kernel's time (30 layers, batch 16, random blocks: 96 tokens 6.2 -> 5.4 ms,
// 512 tokens 27.8 -> 22.7 ms; 2, 4, 6 and 8 blocks were slower than 3).
constexpr int64_t LEAD = 3;

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void to_float(const at::BFloat16* src, float* __restrict__ dst, int64_t n) {
  // bf16 is the top half of a float32: widen the bits (the loop vectorizes).
  const uint16_t* __restrict__ s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* __restrict__ d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// A later block is somewhere else in the cache: ask for all of its lines now, so the loads overlap
// this block's arithmetic instead of stalling on each jump. Into L2, not L1 (prefetcht1): the blocks come
// from memory (the GEMMs between two layers' attention evict them), and requests for L1 queue behind its
// few fill buffers, so a block's requests stalled the loop that made them. 30 layers, batch 16, random
// blocks, 9 MB streamed between layers (a 2-core Zen 4): 64 tokens of context 3.35 -> 2.95 ms, 96: 5.00 ->
// 4.19, 160: 9.58 -> 7.03, 512: 16.5 -> 11.7.
template <typename T>
inline void prefetch_block(const T* p, int64_t elems) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elems * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 2);
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// a += sum over rows t of p[t] * v[t]. With the head size known at compile time the accumulator is a
// local array the compiler keeps in vector registers across the block's rows.
template <int64_t HEAD_DIM>
inline void accumulate(float* __restrict__ a, const float* __restrict__ p, const float* __restrict__ v,
                       int64_t rows, int64_t D) {
  if constexpr (HEAD_DIM > 0) {
    float r[HEAD_DIM];
    for (int64_t d = 0; d < HEAD_DIM; ++d) r[d] = a[d];
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t d = 0; d < HEAD_DIM; ++d) r[d] += p[t] * v[t * HEAD_DIM + d];
    for (int64_t d = 0; d < HEAD_DIM; ++d) a[d] = r[d];
  } else {
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t d = 0; d < D; ++d) a[d] += p[t] * v[t * D + d];
  }
}

#if defined(__AVX512BF16__)
// bf16 scores on CPUs with AVX512-BF16: vdpbf16ps multiplies q and k exactly and sums in float32, 32
// dimensions an instruction, giving each key a vector of 16 partial sums; hsum16 then folds 16 keys'
// vectors into one vector of their 16 scores (45 instructions), where a lone dot product would pay a
// horizontal sum of its own (at 512 tokens of context the whole kernel ran at ~20 GFLOP/s). The fold is
// a fixed tree, so a score never depends on the other keys or sequences.
struct Fold {
  __m512i lo[4], hi[4];   // per stage: where each output lane's two addends sit in (a, b)
  Fold() {
    for (int s = 0; s < 4; ++s) {
      const int g = 16 >> s, half = g / 2, groups = 1 << s;     // group size before this stage
      alignas(64) int32_t l[16], h[16];
      for (int lane = 0; lane < 16; ++lane) {
        const int j = lane / half, i = lane % half;
        const int src = j < groups ? j * g + i : 16 + (j - groups) * g + i;
        l[lane] = src;
        h[lane] = src + half;
      }
      lo[s] = _mm512_load_si512(l);
      hi[s] = _mm512_load_si512(h);
    }
  }
};

inline __m512 hsum16(__m512* v) {
  static const Fold fold;
  int n = 16;
  for (int s = 0; s < 4; ++s, n /= 2)
    for (int i = 0; i < n / 2; ++i)
      v[i] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * i], fold.lo[s], v[2 * i + 1]),
                           _mm512_permutex2var_ps(v[2 * i], fold.hi[s], v[2 * i + 1]));
  return v[0];
}

// scores[t] = (q . k[t]) * scale for n <= 16 consecutive keys of one block (rows of D bf16, D % 32 == 0).
inline void scores16(const at::BFloat16* q, const at::BFloat16* k, int64_t n, int64_t D, float scale,
                     float* scores) {
  __m512 v[16];
  for (int64_t t = 0; t < 16; ++t) {
    __m512 acc = _mm512_setzero_ps();
    if (t < n)
      for (int64_t d = 0; d < D; d += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + t * D + d));
    v[t] = acc;
  }
  const __m512 out = _mm512_mul_ps(hsum16(v), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(scores, static_cast<__mmask16>((1u << n) - 1), out);
}
#endif

struct Shape {
  int64_t B, H, Hkv, D, slots, max_blocks, block_size, window;
  float scale, softcap;
};

// HEAD_DIM > 0 fixes the head size at compile time (the common ones), so the loops over it unroll into a
// few vector instructions; 0 reads it at run time.
template <typename T, int64_t HEAD_DIM>
void attend(const Shape& s, const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
            const int64_t* lens, T* out) {
  const int64_t G = s.H / s.Hkv, D = HEAD_DIM > 0 ? HEAD_DIM : s.D, bs = s.block_size;
  // The first LEAD blocks of K and of V that (sequence, head) number i reads.
  auto prefetch_start = [&](int64_t i) {
    const int64_t b = i / s.Hkv, h = i % s.Hkv, len = lens[b];
    const int64_t first = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0;
    const int64_t* table = tables + b * s.max_blocks;
    for (int64_t t0 = first - first % bs, j = 0; t0 < len && j < LEAD; t0 += bs, ++j) {
      prefetch_block(k_cache + (h * s.slots + table[t0 / bs] * bs) * D, bs * D);
      prefetch_block(v_cache + (h * s.slots + table[t0 / bs] * bs) * D, bs * D);
    }
  };
  auto pairs = [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), block(bs * D), scores;
    if (begin < end) prefetch_start(begin);
    for (int64_t i = begin; i < end; ++i) {
      if (i + 1 < end) prefetch_start(i + 1);      // the next pair's first blocks, while this one computes
      const int64_t b = i / s.Hkv, h = i % s.Hkv, len = lens[b];
      const int64_t first = s.window > 0 ? std::max<int64_t>(0, len - s.window) : 0, n = len - first;
      const T* qrow = q + (b * s.H + h * G) * D;        // the G query heads that share KV head h
      to_float(qrow, qf.data(), G * D);
      scores.resize(G * n);
      const int64_t* table = tables + b * s.max_blocks;
      // Scores, block by block: a block's rows for head h are contiguous in the cache.
      for (int64_t t0 = first - first % bs; t0 < len; t0 += bs) {
        const int64_t lo = std::max(t0, first), hi = std::min(t0 + bs, len);
        const T* kb = k_cache + (h * s.slots + table[t0 / bs] * bs) * D;
        if (t0 + AHEAD * bs < len) prefetch_block(k_cache + (h * s.slots + table[t0 / bs + AHEAD] * bs) * D, bs * D);
        // V's blocks past the first LEAD are requested during the K pass, LEAD blocks ahead.
        if (t0 + LEAD * bs < len) prefetch_block(v_cache + (h * s.slots + table[t0 / bs + LEAD] * bs) * D, bs * D);
#if defined(__AVX512BF16__)
        if (std::is_same_v<T, at::BFloat16> && D % 32 == 0) {
          for (int64_t g = 0; g < G; ++g)
            for (int64_t t = lo; t < hi; t += 16)
              scores16(reinterpret_cast<const at::BFloat16*>(qrow) + g * D,
                       reinterpret_cast<const at::BFloat16*>(kb) + (t - t0) * D, std::min<int64_t>(16, hi - t), D,
                       s.scale, scores.data() + g * n + (t - first));
        } else
#endif
        {
          to_float(kb + (lo - t0) * D, block.data(), (hi - lo) * D);
          for (int64_t g = 0; g < G; ++g) {
            float* x = scores.data() + g * n + (lo - first);
            for (int64_t t = 0; t < hi - lo; ++t) x[t] = dot(qf.data() + g * D, block.data() + t * D, D) * s.scale;
          }
        }
        if (s.softcap > 0.f)
          for (int64_t g = 0; g < G; ++g) {
            float* x = scores.data() + g * n + (lo - first);
            for (int64_t t = 0; t < hi - lo; ++t) x[t] = std::tanh(x[t] / s.softcap) * s.softcap;
          }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* x = scores.data() + g * n;
        const float m = *std::max_element(x, x + n);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) x[t] = exp_approx(x[t] - m);
        for (int64_t t = 0; t < n; ++t) sum += x[t];
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) x[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = first - first % bs; t0 < len; t0 += bs) {
        const int64_t lo = std::max(t0, first), hi = std::min(t0 + bs, len);
        const T* vb = v_cache + (h * s.slots + table[t0 / bs] * bs) * D;
        if (t0 + AHEAD * bs < len) prefetch_block(v_cache + (h * s.slots + table[t0 / bs + AHEAD] * bs) * D, bs * D);
        to_float(vb + (lo - t0) * D, block.data(), (hi - lo) * D);
        for (int64_t g = 0; g < G; ++g)
          accumulate<HEAD_DIM>(acc.data() + g * D, scores.data() + g * n + (lo - first), block.data(), hi - lo, D);
      }
      T* orow = out + (b * s.H + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) orow[j] = static_cast<T>(acc[j]);
    }
  };
  // One engine thread: share the (query, head) pairs with the helper thread, in runs (each run prefetches
  // its next pair's first blocks). Which thread computes a pair changes none of its bits.
  loraserve::parallel_runs(s.B * s.Hkv, RUNS, pairs);
}

template <typename T>
void attend_any(const Shape& s, const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                const int64_t* lens, T* out) {
  switch (s.D) {
    case 64: return attend<T, 64>(s, q, k_cache, v_cache, tables, lens, out);
    case 128: return attend<T, 128>(s, q, k_cache, v_cache, tables, lens, out);
    case 256: return attend<T, 256>(s, q, k_cache, v_cache, tables, lens, out);
    default: return attend<T, 0>(s, q, k_cache, v_cache, tables, lens, out);
  }
}

}  // namespace

// q [B, H, D]; k_cache, v_cache [Hkv, slots, D]; block_tables [B, max_blocks] int64; seq_lens [B] int64
// (query b is the last of seq_lens[b] tokens); window <= 0: no sliding window; softcap <= 0: none.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, int64_t block_size,
                                     double scale, double softcap, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(0) == 0, "head sizes do not match");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              block_tables.is_contiguous() && seq_lens.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(seq_lens.size(0) == q.size(0) && block_tables.size(0) == q.size(0), "one table per query");
  auto out = torch::empty_like(q);
  const Shape s{q.size(0), q.size(1), k_cache.size(0), q.size(2), k_cache.size(1), block_tables.size(1),
                block_size, window, static_cast<float>(scale), static_cast<float>(softcap)};
  const auto* tables = block_tables.data_ptr<int64_t>();
  const auto* lens = seq_lens.data_ptr<int64_t>();
  const int64_t num_blocks = s.slots / block_size;
  for (int64_t b = 0; b < s.B; ++b) {   // every block a sequence reads must lie inside the cache
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= s.max_blocks * block_size, "sequence ", b, ": length ", lens[b],
                " does not fit its block table");
    for (int64_t j = 0; j < (lens[b] + block_size - 1) / block_size; ++j)
      TORCH_CHECK(tables[b * s.max_blocks + j] >= 0 && tables[b * s.max_blocks + j] < num_blocks,
                  "sequence ", b, ": block ", tables[b * s.max_blocks + j], " is outside the cache");
  }
  if (q.scalar_type() == at::kBFloat16) {
    attend_any(s, q.data_ptr<at::BFloat16>(), k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
           tables, lens, out.data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "bfloat16 or float32 only");
    attend_any(s, q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), tables, lens,
           out.data_ptr<float>());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL, like torch's own ops: the HTTP thread keeps serving streams while a step computes.
  m.def("paged_decode_attention", &paged_decode_attention, "each query row over its own context in the paged KV cache",
        py::call_guard<py::gil_scoped_release>());
  loraserve::def_set_helper(m, "with one torch thread, share the (query, head) pairs "
                                 "with the helper thread (the same bits)");
  loraserve::def_helper_sharing(m);
}
