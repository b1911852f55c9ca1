// Weight-only products for the CPU decode step (two ops; the second, for dense bf16 weights, is
// further down). The first: int8 weights in blocks of G along the
// input dimension, each block with an fp32 scale (llama.cpp's Q8_0 layout, fp32 scales), times
// a few fp32 rows:
//
//   out[m, n] = bias[n] + sum_k x[m, k] * (q[n, k] * scale[n, k / G])
//
// The weight is stored in panels of kNR = 16 output rows, interleaved along k
// (qweight: (P, K, 16) int8, scales: (P, K / G, 16) fp32, P = ceil(N / 16); rows past N are
// zero), so that one 16-byte load holds the k-th weight of 16 outputs. Each thread takes whole
// panels: it widens kKC columns of a panel to fp32 (scale applied) into a buffer that stays in
// L1, then every row of x multiplies that buffer with kMR rows at a time held in registers. The
// weight is read from memory once per call, whatever the number of rows.
//
// Why a kernel: a 7B decode step reads 7 GB of weights as int8 (14.5 GB as bf16); on a 2-core
// AVX2 VM torch's own weight-only product (aten::_weight_int8pack_mm, bf16 activations) took
// 5.2 ms for one row of a 14336 x 4096 weight and 18 ms for 8 rows, where the bytes alone allow
// ~4 ms at any row count (BENCHMARKS.md, issue 23).
//
// Results: the products are exact fp32 multiply-adds of the dequantized weight (q * scale,
// one fp32 rounding) summed in fp32, in another order than a float64 reference.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LORA_KIT_WO_AVX2 1
#endif

namespace {

constexpr int64_t kNR = 16;   // output rows per panel
constexpr int64_t kKC = 256;  // columns widened at a time: 16 KB of fp32, in L1
constexpr int64_t kMR = 6;    // rows of x per register block: 12 accumulators, FMA latency hidden

// buf[k * 16 + j] = q[k0 + k, j] * scale[(k0 + k) / G, j] for k < kc; k0 and kc are multiples of G
// but for the last chunk (kc < kKC), which ends the row: a group at a time, its scales loaded once.
inline void widen_panel(const int8_t* q, const float* scales, int64_t k0, int64_t kc, int64_t G, float* buf) {
  for (int64_t g0 = 0; g0 < kc; g0 += G) {
    const float* s = scales + ((k0 + g0) / G) * kNR;
    const int64_t g1 = std::min(kc, g0 + G);
#ifdef LORA_KIT_WO_AVX2
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    for (int64_t k = g0; k < g1; ++k) {
      const __m128i qk = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + k) * kNR));
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qk));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(qk, qk)));
      _mm256_store_ps(buf + k * kNR, _mm256_mul_ps(lo, s0));
      _mm256_store_ps(buf + k * kNR + 8, _mm256_mul_ps(hi, s1));
    }
#else
    for (int64_t k = g0; k < g1; ++k) {
      for (int64_t j = 0; j < kNR; ++j) buf[k * kNR + j] = static_cast<float>(q[(k0 + k) * kNR + j]) * s[j];
    }
#endif
  }
}

// acc[r, 0:16] += sum_k x[r, k] * buf[k, 0:16] for MR rows of x (row stride ldx) and kc columns.
template <int64_t MR>
inline void rows_times_panel(const float* x, int64_t ldx, const float* buf, int64_t kc, float* acc) {
#ifdef LORA_KIT_WO_AVX2
  __m256 c[MR][2];
  for (int64_t r = 0; r < MR; ++r) {
    c[r][0] = _mm256_loadu_ps(acc + r * kNR);
    c[r][1] = _mm256_loadu_ps(acc + r * kNR + 8);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(buf + k * kNR);
    const __m256 w1 = _mm256_loadu_ps(buf + k * kNR + 8);
    for (int64_t r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      c[r][0] = _mm256_fmadd_ps(xv, w0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(xv, w1, c[r][1]);
    }
  }
  for (int64_t r = 0; r < MR; ++r) {
    _mm256_storeu_ps(acc + r * kNR, c[r][0]);
    _mm256_storeu_ps(acc + r * kNR + 8, c[r][1]);
  }
#else
  for (int64_t r = 0; r < MR; ++r) {
    for (int64_t k = 0; k < kc; ++k) {
      const float xv = x[r * ldx + k];
      for (int64_t j = 0; j < kNR; ++j) acc[r * kNR + j] += xv * buf[k * kNR + j];
    }
  }
#endif
}

// acc[0:16] += sum_k x[k] * q[k0 + k, 0:16] * scale for one row: no buffer, the int8 weights widened
// in registers, each group summed unscaled and scaled once (one row is bound by widening, not FMAs).
inline void row_times_int8(const float* x, const int8_t* q, const float* scales, int64_t k0, int64_t kc, int64_t G,
                           float* acc) {
#ifdef LORA_KIT_WO_AVX2
  __m256 c0 = _mm256_loadu_ps(acc), c1 = _mm256_loadu_ps(acc + 8);
  for (int64_t g0 = 0; g0 < kc; g0 += G) {
    const float* s = scales + ((k0 + g0) / G) * kNR;
    const int64_t g1 = std::min(kc, g0 + G);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    int64_t k = g0;
    for (; k + 2 <= g1; k += 2) {  // two k at a time: four independent sums
      const __m128i qa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + k) * kNR));
      const __m128i qb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + k + 1) * kNR));
      const __m256 xa = _mm256_broadcast_ss(x + k), xb = _mm256_broadcast_ss(x + k + 1);
      a0 = _mm256_fmadd_ps(xa, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa)), a0);
      a1 = _mm256_fmadd_ps(xa, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(qa, qa))), a1);
      b0 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qb)), b0);
      b1 = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(qb, qb))), b1);
    }
    for (; k < g1; ++k) {
      const __m128i qa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (k0 + k) * kNR));
      const __m256 xa = _mm256_broadcast_ss(x + k);
      a0 = _mm256_fmadd_ps(xa, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qa)), a0);
      a1 = _mm256_fmadd_ps(xa, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(qa, qa))), a1);
    }
    c0 = _mm256_fmadd_ps(_mm256_add_ps(a0, b0), _mm256_loadu_ps(s), c0);
    c1 = _mm256_fmadd_ps(_mm256_add_ps(a1, b1), _mm256_loadu_ps(s + 8), c1);
  }
  _mm256_storeu_ps(acc, c0);
  _mm256_storeu_ps(acc + 8, c1);
#else
  for (int64_t k = 0; k < kc; ++k) {
    const float* s = scales + ((k0 + k) / G) * kNR;
    for (int64_t j = 0; j < kNR; ++j) acc[j] += x[k] * (static_cast<float>(q[(k0 + k) * kNR + j]) * s[j]);
  }
#endif
}

void wo_int8_impl(float* out, const float* x, const int8_t* q, const float* scales, const float* bias, int64_t M,
                  int64_t N, int64_t K, int64_t G) {
  const int64_t P = (N + kNR - 1) / kNR;
  const int64_t groups = K / G;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kKC * kNR];
    std::vector<float> acc(static_cast<size_t>(M * kNR));
    for (int64_t p = begin; p < end; ++p) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const int8_t* qp = q + p * K * kNR;
      const float* sp = scales + p * groups * kNR;
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        const int64_t kc = std::min(kKC, K - k0);
        if (M == 1) {
          row_times_int8(x + k0, qp, sp, k0, kc, G, acc.data());
          continue;
        }
        widen_panel(qp, sp, k0, kc, G, buf);
        int64_t m = 0;
        for (; m + kMR <= M; m += kMR) rows_times_panel<kMR>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR);
        switch (M - m) {
          case 5: rows_times_panel<5>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR); break;
          case 4: rows_times_panel<4>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR); break;
          case 3: rows_times_panel<3>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR); break;
          case 2: rows_times_panel<2>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR); break;
          case 1: rows_times_panel<1>(x + m * K + k0, K, buf, kc, acc.data() + m * kNR); break;
          default: break;
        }
      }
      const int64_t n0 = p * kNR, width = std::min(kNR, N - n0);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < width; ++j) {
          out[m * N + n0 + j] = acc[m * kNR + j] + (bias != nullptr ? bias[n0 + j] : 0.f);
        }
      }
    }
  });
}

// The bias of an op (nullptr: none), checked to be a contiguous float32 (N,).
const float* bias_data(const c10::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, op,
              ": bias must be a contiguous float32 (N,)");
  return bias->data_ptr<float>();
}

// x (..., K) as fp32 contiguous rows (converted if not), and an fp32 (..., N) output for them. The ops
// take x as it comes and allocate their output: a decode step calls them ~200 times, and each
// Python-side reshape, cast or allocation cost ~1 us per call (measured on the tiled bf16 op).
at::Tensor rows_of(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 1, op, ": x must be a CPU tensor (..., K)");
  return x.to(at::kFloat).contiguous();
}

at::Tensor output_for(const at::Tensor& rows, int64_t N) {
  std::vector<int64_t> sizes = rows.sizes().vec();
  sizes.back() = N;
  return at::empty(sizes, rows.options());
}

// x (..., K) @ dequant(qweight, scales)^T + bias -> (..., N) fp32; all fp32 but the int8 weight.
at::Tensor wo_int8_linear(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scales,
                          const c10::optional<at::Tensor>& bias, int64_t N) {
  const at::Tensor x = rows_of(x_in, "wo_int8_linear");
  TORCH_CHECK(qweight.device().is_cpu() && scales.device().is_cpu(), "wo_int8_linear: CPU tensors only");
  TORCH_CHECK(qweight.dim() == 3 && scales.dim() == 3, "wo_int8_linear: qweight (P, K, 16), scales (P, K / G, 16)");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1), P = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K && qweight.size(2) == kNR && P == (N + kNR - 1) / kNR,
              "wo_int8_linear: qweight does not match x and out_features");
  TORCH_CHECK(scales.size(0) == P && scales.size(2) == kNR && scales.size(1) > 0 && K % scales.size(1) == 0,
              "wo_int8_linear: scales do not match qweight");
  TORCH_CHECK(kKC % (K / scales.size(1)) == 0, "wo_int8_linear: the block size must divide ", kKC);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && qweight.scalar_type() == at::kChar,
              "wo_int8_linear: scales float32, qweight int8");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "wo_int8_linear: weights must be contiguous");
  const float* b = bias_data(bias, N, "wo_int8_linear");
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  wo_int8_impl(out.data_ptr<float>(), x.data_ptr<float>(), qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), b,
               M, N, K, K / scales.size(1));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dense bf16 weights (N, K) times a few fp32 rows, on CPUs where oneDNN has no bf16 (AVX2): the
// weight rows are widened in registers (bf16 is the top half of an fp32: a shift) and summed in
// fp32, each weight row read once per block of rows. With ``round_io`` the rows are rounded to
// bf16 first and the results after (round to nearest even), the roundings of oneDNN's and torch's
// bf16 products, so both paths compute the same numbers up to summation order.
//
// Why: torch's own bf16 product on AVX2 is compute-bound with several rows (8 rows cost 8x one
// row; measured at 7B: 20 s per decode step), and a Python loop over widened blocks pays per-op
// costs on small models.

inline float bf16_round(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7f800000u) == 0x7f800000u) {  // inf or NaN: keep (a NaN stays a NaN)
    bits = (bits & 0x7fffffu) ? (bits | 0x400000u) & 0xffff0000u : bits & 0xffff0000u;
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);
    bits &= 0xffff0000u;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline float bf16_widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef LORA_KIT_WO_AVX2
inline __m256 widen8(const uint16_t* w) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// sums[r * NR + i] = x[r] . w[i] for NR weight rows (stride K) and MR rows of x (stride K).
template <int64_t NR, int64_t MR>
inline void dot_block(const float* x, const uint16_t* w, int64_t K, float* sums) {
  int64_t k = 0;
#ifdef LORA_KIT_WO_AVX2
  __m256 acc[MR][NR];
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t i = 0; i < NR; ++i) acc[r][i] = _mm256_setzero_ps();
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int64_t r = 0; r < MR; ++r) xv[r] = _mm256_loadu_ps(x + r * K + k);
    for (int64_t i = 0; i < NR; ++i) {
      const __m256 wv = widen8(w + i * K + k);
      for (int64_t r = 0; r < MR; ++r) acc[r][i] = _mm256_fmadd_ps(xv[r], wv, acc[r][i]);
    }
  }
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t i = 0; i < NR; ++i) sums[r * NR + i] = hsum(acc[r][i]);
#else
  for (int64_t r = 0; r < MR * NR; ++r) sums[r] = 0.f;
#endif
  for (; k < K; ++k) {
    for (int64_t r = 0; r < MR; ++r)
      for (int64_t i = 0; i < NR; ++i) sums[r * NR + i] += x[r * K + k] * bf16_widen(w[i * K + k]);
  }
}

// NR weight rows from n0 times all M rows of x, kRows rows of x at a time.
template <int64_t NR, int64_t kRows>
void bf16_rows(float* out, const float* x, const uint16_t* w, const float* bias, bool round_out, int64_t M,
               int64_t N, int64_t K, int64_t n0) {
  float sums[kRows * NR];
  int64_t m = 0;
  auto emit = [&](int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < NR; ++i) {
        float v = sums[r * NR + i] + (bias != nullptr ? bias[n0 + i] : 0.f);
        out[(m + r) * N + n0 + i] = round_out ? bf16_round(v) : v;
      }
    }
  };
  for (; m + kRows <= M; m += kRows) {
    dot_block<NR, kRows>(x + m * K, w + n0 * K, K, sums);
    emit(kRows);
  }
  for (; m < M; ++m) {
    dot_block<NR, 1>(x + m * K, w + n0 * K, K, sums);
    emit(1);
  }
}

// x (..., K) @ w (N, K)^T + bias -> (..., N) fp32, w bf16, the rest fp32; round_io: see above.
at::Tensor wo_bf16_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          bool round_io) {
  const at::Tensor x = rows_of(x_in, "wo_bf16_linear");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2, "wo_bf16_linear: weight (N, K) on the CPU");
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "wo_bf16_linear: shapes do not match");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "wo_bf16_linear: weight must be a contiguous bfloat16");
  const float* b = bias_data(bias, N, "wo_bf16_linear");
  at::Tensor out = output_for(x, N);
  if (M == 0 || N == 0) return out;
  const float* xs = x.data_ptr<float>();
  std::vector<float> rounded;
  if (round_io) {
    rounded.resize(static_cast<size_t>(M * K));
    for (int64_t i = 0; i < M * K; ++i) rounded[i] = bf16_round(xs[i]);
    xs = rounded.data();
  }
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
  float* o = out.data_ptr<float>();
  // Register blocks (weight rows x rows of x), measured on a 2-core AVX2 EPYC: one row, 8 weight
  // rows in flight. More rows: 6 x 2 where a block of weight rows stays in L1 while every row of x
  // passes (K <= 2048: 0.15 ms against 0.25 ms for 4 x 3 at 8 rows of 576 x 1536), 4 x 3 where it
  // does not (each weight row widened fewer times: 9.6 ms against 10.6 ms at 8 rows of 14336 x 4096).
  const int64_t nr = M == 1 ? 8 : K <= 2048 ? 6 : 4;
  const int64_t blocks = N / nr;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      if (nr == 8) bf16_rows<8, 1>(o, xs, w, b, round_io, M, N, K, blk * 8);
      else if (nr == 6) bf16_rows<6, 2>(o, xs, w, b, round_io, M, N, K, blk * 6);
      else bf16_rows<4, 3>(o, xs, w, b, round_io, M, N, K, blk * 4);
    }
  });
  for (int64_t n0 = blocks * nr; n0 < N; ++n0) bf16_rows<1, 3>(o, xs, w, b, round_io, M, N, K, n0);  // tail rows
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_kit, m) {
  m.def("wo_int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias, int out_features) -> Tensor");
  m.impl("wo_int8_linear", c10::DispatchKey::CPU, TORCH_FN(wo_int8_linear));
  m.def("wo_bf16_linear(Tensor x, Tensor weight, Tensor? bias, bool round_io) -> Tensor");
  m.impl("wo_bf16_linear", c10::DispatchKey::CPU, TORCH_FN(wo_bf16_linear));
}
