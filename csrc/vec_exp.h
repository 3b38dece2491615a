// Vector float exp and loads on GCC/Clang vector extensions, shared by the C++ kernels that
// take exps over rows (csrc/swav_cpu.cpp: Sinkhorn and the SwAV cross-entropy;
// csrc/contrastive_cpu.cpp: SCE's tiles). Width W is the number of floats; a function compiled
// with a target attribute (avx2, avx512f) gets the wide registers, the same arithmetic at every
// width. exp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, the Cephes degree-5 polynomial
// for e^r (about 1 ulp), 2^n built in the exponent bits; arguments below -87 (e^x under
// FLT_MIN) and -inf give 0, NaN stays NaN.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastssl_vec {

template <typename V>
__attribute__((always_inline)) inline V exp_poly(V x) {
  const V lo = V{} - 87.0f;
  const V xc = x < lo ? lo : x;
  const V t = xc * 1.44269504088896341f;
  const V n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V z = r * r;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * z + r + 1.0f;
}

template <int W>
struct Vec {
  typedef float f __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef uint32_t u __attribute__((vector_size(4 * W)));
  typedef uint16_t h __attribute__((vector_size(2 * W)));
  typedef double d __attribute__((vector_size(8 * W)));
};

#define FASTSSL_INLINE __attribute__((always_inline)) inline

template <int W>
FASTSSL_INLINE typename Vec<W>::f vexp(typename Vec<W>::f x) {
  using F = typename Vec<W>::f;
  using I = typename Vec<W>::i;
  const F lo = F{} - 87.0f;
  const F er = exp_poly(x);  // e^r, the one polynomial (exp_vec's, at width W)
  const F xc = x < lo ? lo : x;
  const F n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  const F y = er * (F)bits;
  return x < lo ? F{} : y;
}

template <int W>
FASTSSL_INLINE typename Vec<W>::f vload(const float* p) {
  typename Vec<W>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
FASTSSL_INLINE void vstore(float* p, typename Vec<W>::f v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace fastssl_vec
