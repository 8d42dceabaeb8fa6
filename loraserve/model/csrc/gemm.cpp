// bf16 linear layers on CPUs with AVX512-BF16, or with AVX2 and FMA (a second path below, on the same
// packed weights): y = x W^T (+ bias), float32 accumulation, one rounding.
//
// At decode batch sizes (a few to a few dozen rows) oneDNN's bf16 GEMM runs far below this core's rate:
// a batch-16 SmolLM2 step spent ~20 ms in it, ~215 GFLOP/s where a 2048^3 GEMM reaches ~500. This kernel
// is one plain microkernel instead: W is packed once into tiles of 16 output columns holding pairs of
// k (the layout vdpbf16ps reads: [N/16][K/2][16][2]), and each block of up to 8 rows x 3 tiles keeps its
// 24 accumulators in registers over the whole of K, reading each weight tile once per block of rows.
// bench/gemm.py: one SmolLM2 step's linears at 16 rows 19.1 ms with oneDNN, 12.4 ms here (1.55x); 1.2x
// at 1 row, 1.1x at 79, even at 512.
//
// Each output element is one accumulator lane that sums the k-pairs in order 0, 1, ..., K/2 - 1,
// whatever block its row or column falls in and however many threads run: a row's result never depends
// on the other rows of the batch, nor a column's on the columns stacked beside it (q/k/v, gate/up and
// LoRA's projection groups stack their members' weights). tests/test_cpu_gemm.py checks both. Built by
// model/kernels.py with CFLAGS_EXACT; the intrinsics spell out every operation.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "helper_thread.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t TILE = 16;        // output columns per tile: one zmm of float32 accumulators
constexpr int ROWS = 8;             // rows per block: 8 x 3 accumulators + 3 weight vectors + 1 broadcast
constexpr int TILES = 3;            //   fit the 32 vector registers

void check_packed(const torch::Tensor& packed) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
              packed.size(2) == TILE && packed.size(3) == 2 && packed.is_contiguous(),
              "packed weight: expected a contiguous CPU bf16 [N/16, K/2, 16, 2] tensor from pack()");
}

}  // namespace

// One linear call's operands: x [M, K], the packed weight (KP k-pairs, NT tiles), bias, y [M, N].
struct GemmArgs {
  const uint16_t* xp;
  int64_t M, K;
  const uint16_t* wp;
  int64_t KP, NT;
  const uint16_t* bp;
  uint16_t* yp;
  int64_t N;
};

#if defined(__AVX512BF16__)
namespace {

// y[m][col] for MB rows x NB tiles starting at tile t0, over K (KP = ceil(K / 2) pairs). An odd K's last
// pair reads x[K-1] alone: its partner's half of the broadcast is zero, as is the weight's padding.
template <int MB, int NB, bool SHARED>
inline void block(const uint16_t* x, int64_t K, const uint16_t* w, int64_t KP, int64_t t0, const uint16_t* bias,
                  uint16_t* y, int64_t N, int64_t pass, int64_t passes) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int t = 0; t < NB; ++t) acc[m][t] = _mm512_setzero_ps();
  const uint16_t* wt[NB];
  for (int t = 0; t < NB; ++t) wt[t] = w + (t0 + t) * KP * TILE * 2;
  // While this block computes, its passes over the rows (8 at a time) ask for the next block of tiles
  // (the weight is packed in the order the blocks run), each pass for its share: with 16 rows the first
  // pass requests the first half of the next block's k-pairs, the second pass the rest, so the memory
  // streams through both passes instead of crowding into the first (a batch-16 step's GEMMs 13.1 ->
  // 11.1 ms; all of it in every pass had taken 14.2 -> 11.3 ms over none). Into L1 (T0): 2-3% faster
  // than T2.
  const int64_t next = NB * KP * TILE * 2;
  int64_t ahead = pass * KP / passes, skip = 0;      // next k-pair to request; steps since the last one
  // One k-pair: a 32-bit broadcast of each row's two x values against NB tiles of the weight.
  // SHARED (more than one pass): the counting above; one pass requests the k-pair it reads, one block on.
  auto step = [&](int64_t kp, size_t xbytes) {
    __m512bh wv[NB];
    const bool request = SHARED ? ++skip == passes : true;
    const int64_t want = SHARED ? ahead : kp;
    for (int t = 0; t < NB; ++t) {
      if (request) _mm_prefetch(reinterpret_cast<const char*>(wt[t] + next + want * TILE * 2), _MM_HINT_T0);
      wv[t] = (__m512bh)_mm512_loadu_si512(wt[t] + kp * TILE * 2);
    }
    if (SHARED && request) {
      skip = 0;
      ++ahead;
    }
    for (int m = 0; m < MB; ++m) {
      uint32_t pair = 0;
      std::memcpy(&pair, x + m * K + 2 * kp, xbytes);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(pair));
      for (int t = 0; t < NB; ++t) acc[m][t] = _mm512_dpbf16_ps(acc[m][t], xb, wv[t]);
    }
  };
  const int64_t full = K / 2;
  for (int64_t kp = 0; kp < full; ++kp) step(kp, 4);
  if (full < KP) step(full, 2);
  for (int t = 0; t < NB; ++t) {
    const int64_t col = (t0 + t) * TILE;
    const int64_t width = std::min<int64_t>(TILE, N - col);
    const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1);
    // bf16 bias widened to float32 (its bits are the top half), added before the one rounding.
    const __m512 b = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, bias + col)), 16))
                          : _mm512_setzero_ps();
    for (int m = 0; m < MB; ++m) {
      const __m512 sum = bias ? _mm512_add_ps(acc[m][t], b) : acc[m][t];
      const __m256bh h = _mm512_cvtneps_pbh(sum);                          // round to nearest even
      _mm256_mask_storeu_epi16(y + m * N + col, mask, (__m256i)h);
    }
  }
}

// Rows in passes of 8 and one pass for the rest (any of 1-7 rows), each over all of K.
template <int NB, bool SHARED>
void passes_of(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t KP, int64_t t0,
               const uint16_t* bias, uint16_t* y, int64_t N) {
  const int64_t passes = (M + ROWS - 1) / ROWS;
  int64_t m = 0, pass = 0;
  for (; m + ROWS <= M; m += ROWS)
    block<ROWS, NB, SHARED>(x + m * K, K, w, KP, t0, bias, y + m * N, N, pass++, passes);
  const uint16_t* xr = x + m * K;
  uint16_t* yr = y + m * N;
  switch (M - m) {
    case 7: return block<7, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 6: return block<6, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 5: return block<5, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 4: return block<4, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 3: return block<3, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 2: return block<2, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    case 1: return block<1, NB, SHARED>(xr, K, w, KP, t0, bias, yr, N, pass, passes);
    default: return;
  }
}

template <int NB>
void rows(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t KP, int64_t t0, const uint16_t* bias,
          uint16_t* y, int64_t N) {
  if (M > ROWS) passes_of<NB, true>(x, M, K, w, KP, t0, bias, y, N);
  else passes_of<NB, false>(x, M, K, w, KP, t0, bias, y, N);
}

}  // namespace

constexpr const char* kPath = "avx512_bf16";

struct Gemm : GemmArgs {
  static constexpr int64_t kTiles = TILES;   // tiles per block: the unit the threads share
  static constexpr int64_t kRuns = 4;        // runs shared with the helper; 8 was no better served (bench/README.md)

  void prepare() {}                          // vdpbf16ps reads x as it is

  void blocks(int64_t b0, int64_t b1) const {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * TILES, left = NT - t0;
      if (left >= 3) rows<3>(xp, M, K, wp, KP, t0, bp, yp, N);
      else if (left == 2) rows<2>(xp, M, K, wp, KP, t0, bp, yp, N);
      else rows<1>(xp, M, K, wp, KP, t0, bp, yp, N);
    }
  }
};

#elif defined(__AVX2__) && defined(__FMA__)
#include "bf16_avx2.h"
namespace {

// CPUs with AVX2 and FMA but no AVX512-BF16 (AMD Zen 2/3, Intel before Cooper Lake): oneDNN has no bf16
// GEMM there and PyTorch's fallback ran a batch-16 SmolLM2 step at ~17 GFLOP/s (~240 ms). This path
// reads the same packed weight: one 256-bit load holds 8 columns' (k even, k odd) pairs; the even
// halves shifted up and the odd ones masked are those weights in float32 (exactly: bf16 is the top half
// of a float32), multiplied by float32 broadcasts of x with FMAs. Each output element is one
// accumulator lane that adds k = 0, 1, ..., K - 1 in order (one FMA each: a bf16 product is exact in
// float32, so each step rounds once, as vdpbf16ps does), whatever rows or columns share its block.
constexpr int ROWS2 = 4;   // 4 rows x 2 halves of a tile: 8 accumulators + the loaded weights, their float32
                           // form, a broadcast and the odd-k mask of 16 ymm (5 or 6 rows: slower, spills)

// y[m][col .. col + 16) for MB rows over one tile's k-pairs; x holds float32 rows of 2 * KP (zero pad).
template <int MB>
void tile_rows(const float* x, int64_t KP, const uint16_t* wt, const uint16_t* bias, uint16_t* y, int64_t N,
               int64_t col) {
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const int64_t KX = 2 * KP;
  // Half by half: one 32-byte load, its even k against every row, then its odd k. Only one weight
  // register is live at a time (both halves' loads held at once: 54 -> 64 GFLOP/s a core, bench/gemm.py);
  // each accumulator still adds k = 2kp, then 2kp + 1, as before.
  for (int64_t kp = 0; kp < KP; ++kp) {
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + kp * TILE * 2 + h * 8 * 2));
      const __m256 we = loraserve::pair_even(v);
      for (int m = 0; m < MB; ++m)
        acc[m][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * KX + 2 * kp), we, acc[m][h]);
      const __m256 wo = loraserve::pair_odd(v);
      for (int m = 0; m < MB; ++m)
        acc[m][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * KX + 2 * kp + 1), wo, acc[m][h]);
    }
  }
  const int64_t width = std::min<int64_t>(TILE, N - col);
  float bf[TILE] = {};                               // bf16 bias widened, added before the one rounding
  if (bias)
    for (int64_t j = 0; j < width; ++j) bf[j] = c10::BFloat16(bias[col + j], c10::BFloat16::from_bits());
  for (int h = 0; h < 2 && 8 * h < width; ++h) {
    const __m256 b = _mm256_loadu_ps(bf + 8 * h);
    for (int m = 0; m < MB; ++m)
      loraserve::store8_bf16(y + m * N + col + 8 * h, bias ? _mm256_add_ps(acc[m][h], b) : acc[m][h],
                 std::min<int64_t>(8, width - 8 * h));
  }
}

}  // namespace

constexpr const char* kPath = "avx2_fma";

struct Gemm : GemmArgs {
  static constexpr int64_t kTiles = 1;       // one tile per block: 16 columns
  // Runs shared with the helper: bound by arithmetic here, a mixed step's GEMM is shared evenly only in
  // short runs (the helper starts on the GEMM once it has done the multi-LoRA deltas posted before it).
  static constexpr int64_t kRuns = 16;
  const float* xf = nullptr;

  // x widened to float32 once per call (rows of 2 * KP, an odd K's pad zero), for the broadcasts.
  void prepare() {
    static thread_local std::vector<float> buf;      // reused from call to call
    buf.resize(M * 2 * KP);
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* row = xp + m * K;
      float* dst = buf.data() + m * 2 * KP;
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, loraserve::widen8(row + k));
      if (k < K) {
        float tail[8];
        _mm256_storeu_ps(tail, loraserve::widen8_partial(row + k, K - k));
        std::copy(tail, tail + (K - k), dst + k);
      }
      if (K % 2) dst[K] = 0.f;                         // the odd K's pad
    }
    xf = buf.data();
  }

  // Tile by tile, the rows in passes of ROWS2 over all of K: a tile's weights come from memory once and
  // from the cache for the other passes.
  void blocks(int64_t t0, int64_t t1) const {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* wt = wp + t * KP * TILE * 2;
      const int64_t col = t * TILE;
      int64_t m = 0;
      for (; m + ROWS2 <= M; m += ROWS2) tile_rows<ROWS2>(xf + m * 2 * KP, KP, wt, bp, yp + m * N, N, col);
      const float* xr = xf + m * 2 * KP;
      uint16_t* yr = yp + m * N;
      switch (M - m) {
        case 3: tile_rows<3>(xr, KP, wt, bp, yr, N, col); break;
        case 2: tile_rows<2>(xr, KP, wt, bp, yr, N, col); break;
        case 1: tile_rows<1>(xr, KP, wt, bp, yr, N, col); break;
        default: break;
      }
    }
  }
};

#endif

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
// With one torch thread and the helper on (set_helper: the engine's choice, engine/llm_engine.py), the helper
// thread (helper_thread.h) shares the columns: Gemm::kRuns runs of column blocks, each read front to back, so
// the next-block prefetch inside a run stays useful. Which thread computes a column changes none of its
// bits. Served on 2 cores it took base SmolLM2 from ~585 to ~735 tok/s (bench/README.md).

torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t out_features,
                     const c10::optional<torch::Tensor>& bias_in) {
  check_packed(packed);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kBFloat16, "x: expected a CPU bf16 tensor");
  const int64_t K = x_in.size(-1), KP = packed.size(1), NT = packed.size(0), N = out_features;
  TORCH_CHECK(KP == (K + 1) / 2 && NT == (N + TILE - 1) / TILE, "x [..., ", K, "] and ", N,
              " outputs do not match the packed weight ", packed.sizes());
  const torch::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  torch::Tensor y = torch::empty(shape, x_in.options());
  torch::Tensor bias;   // read as it is: no float copy made mid-forward (Qwen-style q/k/v biases)
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK(bias_in->device().is_cpu() && bias_in->scalar_type() == at::kBFloat16 && bias_in->numel() == N,
                "bias: expected ", N, " CPU bf16 values");
    bias = bias_in->contiguous();
  }
  if (M == 0 || N == 0) return y;
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const auto* bp = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.data_ptr()) : nullptr;
  const int64_t blocks = (NT + Gemm::kTiles - 1) / Gemm::kTiles;
  Gemm gemm{{xp, M, K, wp, KP, NT, bp, yp, N}};
  gemm.prepare();
  // Threads split the columns only: each element is still summed by one lane, in one order.
  loraserve::parallel_runs(blocks, Gemm::kRuns, [&](int64_t b0, int64_t b1) { gemm.blocks(b0, b1); });
  return y;
}

#else

constexpr const char* kPath = "";

torch::Tensor linear(const torch::Tensor&, const torch::Tensor&, int64_t, const c10::optional<torch::Tensor>&) {
  TORCH_CHECK(false, "this build has neither AVX512-BF16 nor AVX2 with FMA: model/kernels.py checks `path`");
}

#endif

// W [N, K] -> [ceil(N / 16), ceil(K / 2), 16, 2]: element (n, k) at [n / 16][k / 2][n % 16][k % 2], zeros
// in the padding. One copy, made once per weight (model/cpu_gemm.py keeps it beside the plain weight).
torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "pack: expected a CPU bf16 [N, K] weight");
  const int64_t N = w.size(0), K = w.size(1), NT = (N + TILE - 1) / TILE, KP = (K + 1) / 2;
  torch::Tensor padded = torch::zeros({NT * TILE, KP * 2}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  return padded.view({NT, TILE, KP, 2}).permute({0, 2, 1, 3}).contiguous();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "W [N, K] -> the kernel's packed layout", py::arg("weight"));
  m.def("linear", &linear, "x W^T (+ bias) from a packed W; x [..., K] bf16", py::arg("x"), py::arg("packed"),
        py::arg("out_features"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.attr("path") = kPath;   // "avx512_bf16", "avx2_fma", or "" (no fast path: kernels.gemm() gives None)
  loraserve::def_set_helper(m, "with one torch thread, share each GEMM's columns "
                                 "with the helper thread (the same bits)");
  loraserve::def_helper_sharing(m);
}
