// The small per-layer ops of model/decoder.py's lean forward (CPU), one call each instead of the 3-8
// eager PyTorch ops (and their dispatch) that transformers' formulas take.
//
// Same rounding as transformers' PyTorch code, so the results match its float32 forward to float
// rounding and its bf16 forward to the last bit but for a rare tie in RMSNorm's sum or SiLU's exp:
//   rms_norm:  float32 x * rsqrt(mean(x^2) + eps), cast to the dtype, times the weight (in the dtype);
//   rope:      x * cos + rotate_half(q) * sin, each product and the sum rounded to the dtype;
//   silu_mul:  silu(gate) rounded to the dtype, times up.
// Every row is computed on its own, in a fixed order, so a row's result never depends on its batch.
// Built by model/kernels.py without FMA contraction (-ffp-contract=off): a fused a*b+c would round
// differently from PyTorch's separate multiply and add.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fast_exp.h"
#include "helper_thread.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using bf16 = at::BFloat16;

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> T, rounding to nearest even as PyTorch does (NaN is not expected here: no NaN special case).
template <typename T> inline T narrow(float f);
template <> inline float narrow<float>(float f) { return f; }
template <> inline bf16 narrow<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  bf16 out;
  out.x = static_cast<uint16_t>(u >> 16);
  return out;
}
// The value PyTorch holds after computing f in float and storing it as T.
template <typename T> inline float round_to(float f) { return widen(narrow<T>(f)); }

// Inputs may have any strides (they are made contiguous, a no-op for the usual projection outputs).
void check_rows(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, name, " must be bfloat16 or float32");
}

// Calls f with a value of the tensor's element type (check_rows allows only these two).
template <typename F>
void dispatch(at::ScalarType t, F f) {
  if (t == at::kBFloat16) f(bf16{});
  else f(float{});
}

// Rows per parallel task: a decode step's 16 rows stay on one thread (a fork costs more than they do).
constexpr int64_t GRAIN = 64;
constexpr int64_t SHARE_ROWS = 8;  // with one engine thread and the helper on, this many rows or more are
constexpr int64_t RUNS = 8;        // shared with the helper, in runs (helper_thread.h split_runs)

// body(begin, end) over the rows. With the helper (one engine thread: the serving default on 2+ cores), a
// decode batch's rows or a prompt chunk's are shared with it, as the GEMM's columns are: a batch-16
// SmolLM2 decode step 1.3% faster, a 512-token prompt step 4.4% (bench/README.md, session 16). Otherwise
// torch's threads, GRAIN rows a task. Each row is computed by one thread, whichever: the same bits.
template <typename F>
void for_rows(int64_t rows, const F& body) {
  if (!loraserve::try_helper_runs(rows, RUNS, SHARE_ROWS, body)) at::parallel_for(0, rows, GRAIN, body);
}

// Sum of x^2 in 16 lanes folded in a fixed order: vectorizes, and the same row gives the same bits.
template <typename T>
inline float sum_squares(const T* x, int64_t c) {
  constexpr int64_t L = 16;
  float lane[L] = {};
  int64_t i = 0;
  for (; i + L <= c; i += L)
    for (int64_t l = 0; l < L; ++l) lane[l] += widen(x[i + l]) * widen(x[i + l]);
  for (; i < c; ++i) lane[i % L] += widen(x[i]) * widen(x[i]);
  for (int64_t w = L / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

template <typename T>
void rms_norm_rows(const T* x, T* residual, const T* w, T* out, int64_t rows, int64_t c, float eps) {
  for_rows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * c;
      T* o = out + r * c;
      const T* src = xr;
      if (residual != nullptr) {          // residual += x, rounded to T, as PyTorch's add stores it
        T* res = residual + r * c;
        for (int64_t i = 0; i < c; ++i) res[i] = narrow<T>(widen(res[i]) + widen(xr[i]));
        src = res;
      }
      const float inv = 1.0f / std::sqrt(sum_squares(src, c) / static_cast<float>(c) + eps);
      for (int64_t i = 0; i < c; ++i) o[i] = narrow<T>(widen(w[i]) * round_to<T>(widen(src[i]) * inv));
    }
  });
}

torch::Tensor norm_impl(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& residual,
                        const torch::Tensor& weight_in, double eps) {
  check_rows(x_in, "x");
  const auto x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t c = x.size(-1), rows = x.numel() / c;
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c &&
              weight.scalar_type() == x.scalar_type(), "weight must be a [", c, "] of x's dtype");
  if (residual) {
    check_rows(*residual, "residual");
    TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes() &&
                residual->scalar_type() == x.scalar_type(), "residual must be contiguous, with x's shape and dtype");
  }
  auto out = torch::empty_like(x);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, c, static_cast<float>(eps));
  });
  return out;
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return norm_impl(x, c10::nullopt, weight, eps);
}

// residual += x (in place), then the norm of the sum: the two halves of a decoder layer's seam.
torch::Tensor add_rms_norm(const torch::Tensor& x, torch::Tensor residual, const torch::Tensor& weight, double eps) {
  return norm_impl(x, residual, weight, eps);
}

// rotate_half rounding as transformers does it: x * cos + rotate_half(x) * sin, each term rounded to T.
template <typename T>
inline void rotate(const T* x, T* y, const T* c, const T* s, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float rot = i < half ? -widen(x[i + half]) : widen(x[i - half]);   // rotate_half(x)[i]
    y[i] = narrow<T>(round_to<T>(widen(x[i]) * widen(c[i])) + round_to<T>(rot * widen(s[i])));
  }
}

template <typename T>
void rope_write_rows(const T* q, int64_t qs, const T* k, int64_t ks, const T* v, int64_t vs, const T* cos,
                     const T* sin, T* q_out, T* kc, T* vc, const int64_t* slots, int64_t t, int64_t hq,
                     int64_t hkv, int64_t d, int64_t cache_slots) {
  for_rows(t, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * d;
      const T* s = sin + r * d;
      for (int64_t h = 0; h < hq; ++h) rotate(q + r * qs + h * d, q_out + (r * hq + h) * d, c, s, d);
      const int64_t slot = slots[r];
      for (int64_t h = 0; h < hkv; ++h) {    // the caches are [Hkv, slots, D]
        rotate(k + r * ks + h * d, kc + (h * cache_slots + slot) * d, c, s, d);
        std::memcpy(vc + (h * cache_slots + slot) * d, v + r * vs + h * d, d * sizeof(T));
      }
    }
  });
}

// The tensor itself if each of its rows (index 0) is contiguous, however far apart the rows are (a
// column slice of a stacked q/k/v GEMM output); otherwise a contiguous copy.
torch::Tensor spaced_rows(const torch::Tensor& x) {
  return x.dim() >= 2 && x.select(0, 0).is_contiguous() ? x : x.contiguous();
}

// q [T, H, D], k and v [T, Hkv, D], cos/sin [T, D]: returns q rotated (a new [T, H, D] tensor) and writes
// k rotated and v into cache slot slots[t] of the [Hkv, slots, D] caches, as index_copy_ along dim 1.
torch::Tensor rope_write_kv(const torch::Tensor& q_in, const torch::Tensor& k_in, const torch::Tensor& v_in,
                            const torch::Tensor& cos_in, const torch::Tensor& sin_in, torch::Tensor k_cache,
                            torch::Tensor v_cache, const torch::Tensor& slots_in) {
  for (const auto* p : {&q_in, &k_in, &v_in}) check_rows(*p, "q, k and v");
  const auto q = spaced_rows(q_in), k = spaced_rows(k_in), v = spaced_rows(v_in);
  const auto cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const auto slots = slots_in.to(at::kLong).contiguous();
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
              q.size(2) == k.size(2) && q.size(2) % 2 == 0, "q [T, H, D], k and v [T, Hkv, D], with an even D");
  const int64_t t = q.size(0), hkv = k.size(1), d = q.size(2);
  const torch::Tensor& kc = k_cache;
  const torch::Tensor& vc = v_cache;
  for (const torch::Tensor* p : {&k, &v, &cos, &sin, &kc, &vc})
    TORCH_CHECK(p->scalar_type() == q.scalar_type(), "q, k, v, cos, sin and the caches must share a dtype");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == t && cos.size(1) == d && sin.sizes() == cos.sizes(),
              "cos and sin must be [T, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == hkv && k_cache.size(2) == d,
              "caches must be contiguous [Hkv, slots, D]");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == t, "one cache slot per token");
  const int64_t n = k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < t; ++r) TORCH_CHECK(sp[r] >= 0 && sp[r] < n, "cache slot ", sp[r], " out of range");
  auto q_out = torch::empty({t, q.size(1), d}, q.options());
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    rope_write_rows<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k.data_ptr<scalar_t>(), k.stride(0),
                              v.data_ptr<scalar_t>(), v.stride(0), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                              q_out.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                              sp, t, q.size(1), hkv, d, n);
  });
  return q_out;
}

template <typename T>
void silu_mul_rows(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t rows, int64_t c) {
  for_rows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = g + r * gs;
      const T* ur = u + r * us;
      T* o = out + r * c;
      for (int64_t i = 0; i < c; ++i) {
        const float x = widen(gr[i]);
        o[i] = narrow<T>(round_to<T>(x / (1.0f + exp_approx(-x))) * widen(ur[i]));
      }
    }
  });
}

torch::Tensor silu_mul(const torch::Tensor& gate_in, const torch::Tensor& up_in) {
  check_rows(gate_in, "gate");
  check_rows(up_in, "up");
  // [T, I] each, rows possibly spaced (the two halves of one stacked gate/up GEMM output).
  const auto gate = spaced_rows(gate_in.dim() == 1 ? gate_in.unsqueeze(0) : gate_in.flatten(0, -2));
  const auto up = spaced_rows(up_in.dim() == 1 ? up_in.unsqueeze(0) : up_in.flatten(0, -2));
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "gate and up must match");
  auto out = torch::empty(gate_in.sizes(), gate.options());
  const int64_t c = gate.size(-1);
  dispatch(gate.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    silu_mul_rows<scalar_t>(gate.data_ptr<scalar_t>(), gate.stride(0), up.data_ptr<scalar_t>(), up.stride(0),
                            out.data_ptr<scalar_t>(), gate.size(0), c);
  });
  return out;
}

// Index of each row's first maximal value, NaN counting as the maximum: torch.argmax's answer.
// Two passes: the row's maximum, then the first element equal to it (the second pass stops there).
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {   // bf16 is the top half of a float32: widen the bits
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

template <typename T>
int64_t argmax_row(const T* x, int64_t v) {
  float m = -INFINITY;
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 acc[4];   // four accumulators: the max's latency is hidden behind the loads
  for (auto& a : acc) a = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; i + 64 <= v; i += 64)
    for (int k = 0; k < 4; ++k) {
      const __m512 e = load16(x + i + 16 * k);
      unordered |= _mm512_cmp_ps_mask(e, e, _CMP_UNORD_Q);
      acc[k] = _mm512_max_ps(acc[k], e);
    }
  m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3])));
  nan = unordered != 0;
#endif
  for (; i < v; ++i) {
    nan |= std::isnan(widen(x[i]));
    m = std::max(m, widen(x[i]));
  }
  if (nan) {   // torch.max/argmax treat NaN as the maximum: its first index
    for (int64_t j = 0; j < v; ++j)
      if (std::isnan(widen(x[j]))) return j;
  }
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  for (; j + 16 <= v; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load16(x + j), mv, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < v; ++j)
    if (widen(x[j]) == m) return j;
  return 0;
}

template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t v) {
  for_rows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = argmax_row(x + r * v, v);
  });
}

torch::Tensor argmax(const torch::Tensor& logits_in) {
  check_rows(logits_in, "logits");
  const auto logits = logits_in.contiguous();
  TORCH_CHECK(logits.dim() == 2, "logits must be [S, V]");
  auto out = torch::empty({logits.size(0)}, logits.options().dtype(at::kLong));
  dispatch(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    argmax_rows<scalar_t>(logits.data_ptr<scalar_t>(), out.data_ptr<int64_t>(), logits.size(0), logits.size(1));
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released: the serving loop's HTTP thread streams tokens while these run.
  using gil = py::call_guard<py::gil_scoped_release>;
  m.def("rms_norm", &rms_norm, "RMSNorm of x [..., C] (transformers' Llama rounding)", py::arg("x"),
        py::arg("weight"), py::arg("eps"), gil());
  m.def("add_rms_norm", &add_rms_norm, "residual += x in place, then RMSNorm of the sum", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"), gil());
  m.def("rope_write_kv", &rope_write_kv, "rotary embedding of q (returned) and k; k and v to their cache slots",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("slots"), gil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", py::arg("gate"), py::arg("up"), gil());
  m.def("argmax", &argmax, "first index of each row's maximum, [S, V] -> [S] int64", py::arg("logits"), gil());
  loraserve::def_set_helper(m, "with one torch thread, share the rows of 8 or more with the helper thread "
                               "(the same bits)");
  loraserve::def_helper_sharing(m);
}
