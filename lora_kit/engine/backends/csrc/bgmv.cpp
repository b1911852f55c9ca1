// Batched LoRA for the CPU (BGMV): every row with its own adapter, in one call per module.
//
//   out[n, :] += (x[n, :] @ A[s]) @ B[s]      for every row n whose slot s = slots[n] >= 0
//
// and, for weighted mixes (bgmv_mix_), the scaled sum over a row's K (slot, scale) pairs.
//
// A: (S, R, I) and B: (S, R, O) are the stacked slots of one module (PEFT's A and B^T,
// the LoRA scale folded into B), fp32 or bf16; x: (..., I) and out: (..., O) are fp32. Rows
// with a negative slot are skipped (they read nothing). Each row reads its adapter's A and B straight
// from the stacks: no gathered copies, no intermediate tensors, one parallel region.
//
// Why a kernel: a CPU decode step multiplies a few rows by many small matrices, where torch's
// bmm pair costs two dispatches, two parallel regions and a gathered copy of every row's
// weights; measured on the embedded model, that put the LoRA cost of 8 distinct adapters at
// ~9 ms of a ~52 ms decode step, against ~2.5 ms for the bytes it has to read.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Weights are fp32, or bf16 stored as raw 16-bit words and widened by a shift (bf16 is the
// top half of an fp32), which vectorizes; c10::BFloat16's conversion operator did not.
inline float widen(float w) { return w; }
inline float widen(uint16_t w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t kMaxRank = 256;
constexpr int64_t kV = 16;  // floats per AVX-512 register; chunks of out start at multiples of it
constexpr int64_t kJ = 8;   // rank rows per pass over x: 8 independent accumulators

// h[j] = x . a[j] for j < R (a: R x I). Rank rows go kJ at a time, each with a vector
// accumulator of its own, so the multiply-adds do not wait on one another.
template <typename W, int64_t RANK>
inline void lora_down(const float* x, const W* a, int64_t I, int64_t rank, float* h) {
  const int64_t R = RANK > 0 ? RANK : rank;
  int64_t j0 = 0;
  for (; j0 + kJ <= R; j0 += kJ) {
    float acc[kJ][kV] = {};
    int64_t k = 0;
    for (; k + kV <= I; k += kV) {
      for (int64_t j = 0; j < kJ; ++j) {
        const W* aj = a + (j0 + j) * I + k;
#pragma omp simd
        for (int64_t t = 0; t < kV; ++t) acc[j][t] += x[k + t] * widen(aj[t]);
      }
    }
    for (int64_t j = 0; j < kJ; ++j) {
      float sum = 0.f;
      for (int64_t t = 0; t < kV; ++t) sum += acc[j][t];
      const W* aj = a + (j0 + j) * I;
      for (int64_t kk = k; kk < I; ++kk) sum += x[kk] * widen(aj[kk]);
      h[j0 + j] = sum;
    }
  }
  for (; j0 < R; ++j0) {  // a rank that is not a multiple of kJ
    const W* aj = a + j0 * I;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < I; ++k) sum += x[k] * widen(aj[k]);
    h[j0] = sum;
  }
}

// out[o0:o1] += h @ b[:, o0:o1] (b: R x O): each block of kV outputs is read and written
// once, accumulating all R rank rows in a register.
template <typename W, int64_t RANK>
inline void lora_up(const float* h, const W* b, int64_t rank, int64_t O, int64_t o0, int64_t o1, float* out) {
  const int64_t R = RANK > 0 ? RANK : rank;
  int64_t o = o0;
  for (; o + kV <= o1; o += kV) {
    float acc[kV];
#pragma omp simd
    for (int64_t t = 0; t < kV; ++t) acc[t] = out[o + t];
    for (int64_t j = 0; j < R; ++j) {
      const float hj = h[j];
      const W* bj = b + j * O + o;
#pragma omp simd
      for (int64_t t = 0; t < kV; ++t) acc[t] += hj * widen(bj[t]);
    }
#pragma omp simd
    for (int64_t t = 0; t < kV; ++t) out[o + t] = acc[t];
  }
  for (; o < o1; ++o) {
    float acc = out[o];
    for (int64_t j = 0; j < R; ++j) acc += h[j] * widen(b[j * O + o]);
    out[o] = acc;
  }
}

// K adapters per row (K = 1 but for weighted mixes): row n adds, for each k whose slot
// s = slots[m * K + k] >= 0 (m = n / per_slot), scale_k * (x[n] @ A[s]) @ B[s]; ``scales`` is
// null for scale 1 (the scale multiplies the rank-sized h, not B: no scaled copy of B).
template <typename W, int64_t RANK>
void bgmv_impl(float* out, const float* x, const W* A, const W* B, const int64_t* slots, const float* scales,
               int64_t K, int64_t N, int64_t per_slot, int64_t I, int64_t rank, int64_t O) {
  // Fewer rows than threads: split each row's output columns too (each piece recomputes the
  // row's small x @ A, cheaper than a second parallel region).
  const int64_t threads = at::get_num_threads();
  int64_t pieces = std::max<int64_t>(1, (threads + N - 1) / N);
  const int64_t width = ((O + pieces - 1) / pieces + kV - 1) / kV * kV;
  pieces = (O + width - 1) / width;
  const int64_t R = RANK > 0 ? RANK : rank;
  at::parallel_for(0, N * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / pieces;
      const int64_t o0 = (t % pieces) * width;
      const int64_t o1 = std::min(O, o0 + width);
      const int64_t m = n / per_slot;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = slots[m * K + k];
        if (s < 0) continue;
        float h[RANK > 0 ? RANK : kMaxRank];
        lora_down<W, RANK>(x + n * I, A + s * rank * I, I, rank, h);
        if (scales != nullptr) {
          const float c = scales[m * K + k];
          for (int64_t j = 0; j < R; ++j) h[j] *= c;
        }
        lora_up<W, RANK>(h, B + s * rank * O, rank, O, o0, o1, out + n * O);
      }
    }
  });
}

template <typename W>
void dispatch_rank(float* out, const float* x, const W* A, const W* B, const int64_t* slots, const float* scales,
                   int64_t K, int64_t N, int64_t per_slot, int64_t I, int64_t R, int64_t O) {
  switch (R) {
    case 8: return bgmv_impl<W, 8>(out, x, A, B, slots, scales, K, N, per_slot, I, R, O);
    case 16: return bgmv_impl<W, 16>(out, x, A, B, slots, scales, K, N, per_slot, I, R, O);
    case 32: return bgmv_impl<W, 32>(out, x, A, B, slots, scales, K, N, per_slot, I, R, O);
    case 64: return bgmv_impl<W, 64>(out, x, A, B, slots, scales, K, N, per_slot, I, R, O);
    default: return bgmv_impl<W, 0>(out, x, A, B, slots, scales, K, N, per_slot, I, R, O);
  }
}

// out (..., O) and x (..., I) hold N = x.numel() / I rows; slots (M, K) gives the K slots of each
// group of N / M consecutive rows (a prefill passes one group per sequence, not per token), and
// scales (M, K) their weights (undefined: all 1).
void run_bgmv(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
              const at::Tensor& slots, const at::Tensor* scales) {
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && lora_a.device().is_cpu() && lora_b.device().is_cpu() &&
                  slots.device().is_cpu(),
              "bgmv_: CPU tensors only");
  TORCH_CHECK(out.dim() >= 1 && x.dim() >= 1 && lora_a.dim() == 3 && lora_b.dim() == 3 &&
                  (slots.dim() == 1 || slots.dim() == 2),
              "bgmv_: out (..., O), x (..., I), lora_a (S, R, I), lora_b (S, R, O), slots (M,) or (M, K)");
  const int64_t I = lora_a.size(2), S = lora_a.size(0), R = lora_a.size(1), O = lora_b.size(2);
  TORCH_CHECK(x.size(-1) == I && out.size(-1) == O && lora_b.size(0) == S && lora_b.size(1) == R,
              "bgmv_: A/B shapes do not match x and out");
  const int64_t N = I > 0 ? x.numel() / I : 0, M = slots.size(0), K = slots.dim() == 2 ? slots.size(1) : 1;
  TORCH_CHECK(out.numel() == N * O, "bgmv_: x and out hold different numbers of rows");
  TORCH_CHECK(N == 0 || (M > 0 && N % M == 0), "bgmv_: ", N, " rows cannot be split over ", M, " slots");
  TORCH_CHECK(R <= kMaxRank, "bgmv_: rank above ", kMaxRank);
  TORCH_CHECK(out.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "bgmv_: out and x must be float32");
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type() &&
                  (lora_a.scalar_type() == at::kFloat || lora_a.scalar_type() == at::kBFloat16),
              "bgmv_: A and B must both be float32 or both bfloat16");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "bgmv_: slots must be int64");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous() && lora_a.is_contiguous() && lora_b.is_contiguous() &&
                  slots.is_contiguous(),
              "bgmv_: tensors must be contiguous");
  const float* c = nullptr;
  if (scales != nullptr) {
    TORCH_CHECK(scales->device().is_cpu() && scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                    scales->sizes() == slots.sizes(),
                "bgmv_mix_: scales must be a contiguous float32 CPU tensor shaped like slots");
    c = scales->data_ptr<float>();
  }
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t m = 0; m < M * K; ++m) TORCH_CHECK(s[m] < S, "bgmv_: slot ", s[m], " out of range (", S, " slots)");
  if (N == 0 || R == 0 || O == 0) return;
  const int64_t per_slot = N / M;
  if (lora_a.scalar_type() == at::kFloat) {
    dispatch_rank<float>(out.data_ptr<float>(), x.data_ptr<float>(), lora_a.data_ptr<float>(),
                         lora_b.data_ptr<float>(), s, c, K, N, per_slot, I, R, O);
  } else {
    dispatch_rank<uint16_t>(out.data_ptr<float>(), x.data_ptr<float>(),
                            reinterpret_cast<const uint16_t*>(lora_a.data_ptr<c10::BFloat16>()),
                            reinterpret_cast<const uint16_t*>(lora_b.data_ptr<c10::BFloat16>()), s, c, K, N, per_slot,
                            I, R, O);
  }
}

void bgmv_(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
           const at::Tensor& slots) {
  TORCH_CHECK(slots.dim() == 1, "bgmv_: slots must be (M,)");
  run_bgmv(out, x, lora_a, lora_b, slots, nullptr);
}

// Weighted mixes: each group of rows adds the scaled sum of its K adapters (slot -1: nothing).
void bgmv_mix_(at::Tensor out, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
               const at::Tensor& slots, const at::Tensor& scales) {
  TORCH_CHECK(slots.dim() == 2, "bgmv_mix_: slots must be (M, K)");
  run_bgmv(out, x, lora_a, lora_b, slots, &scales);
}

}  // namespace

TORCH_LIBRARY(lora_kit, m) {
  m.def("bgmv_(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor slots) -> ()");
  m.def("bgmv_mix_(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor slots, Tensor scales) -> ()");
  m.impl("bgmv_", c10::DispatchKey::CPU, TORCH_FN(bgmv_));
  m.impl("bgmv_mix_", c10::DispatchKey::CPU, TORCH_FN(bgmv_mix_));
}
