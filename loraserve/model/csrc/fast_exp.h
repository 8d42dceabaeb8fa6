// exp(x) as plain float arithmetic, shared by the C++ kernels (paged_attention.cpp's softmax,
// layer_ops.cpp's SiLU): loops calling it vectorize, where libm's expf is a call per element (~5 ms a
// step for SmolLM2's 30 MLPs at batch 16). 2^k * p(r), r in [-ln2/2, ln2/2], Cephes' degree-6
// polynomial, relative error ~2e-7 (PyTorch's vectorized exp is within 1 ulp of exact, so a value may
// differ from PyTorch's in float's last bit). Where expf under- or overflows, so does this: 0 below -87
// (k would leave float's exponent range), infinity above ln(FLT_MAX) (so silu(-200) is -0, as in
// PyTorch). 2^k is applied as 2^(k-1) * 2 so that k = 128 (x up to ln(FLT_MAX)) still fits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

inline float exp_approx(float x_in) {
  const float x = std::min(std::max(x_in, -87.0f), 88.72283f);
  const float k = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 126) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x_in > 88.72283f ? INFINITY : p * scale * 2.0f;
}
