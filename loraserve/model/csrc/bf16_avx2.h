// bf16 <-> float32 on CPUs with AVX2 (and no AVX512-BF16), 8 lanes at a time, shared by the GEMM
// (gemm.cpp) and the multi-LoRA kernel (multi_lora.cpp). bf16 is the top half of a float32, so widening
// is exact; narrowing rounds to nearest even with NaN kept NaN, as torch does.
#pragma once

#if defined(__AVX2__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace loraserve {

inline __m256 widen8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// The first n < 8 values, zeros after (zero times a finite value adds exactly nothing).
inline __m256 widen8_partial(const uint16_t* p, int64_t n) {
  uint16_t buf[8] = {};
  std::memcpy(buf, p, n * sizeof(uint16_t));
  return widen8(buf);
}

// Round 8 float32 to bf16 and store the first `width` <= 8.
inline void store8_bf16(uint16_t* dst, __m256 v, int64_t width) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (width == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  } else {
    uint16_t buf[8];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), h);
    std::memcpy(dst, buf, width * sizeof(uint16_t));
  }
}

// A 32-bit lane holding a bf16 pair (the even k in its low half, the odd k in its high half) as the
// two float32 values: the low half shifted up, the high half with the low one cleared.
inline __m256 pair_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 pair_odd(__m256i v) {
  return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u))));
}

}  // namespace loraserve
#endif
