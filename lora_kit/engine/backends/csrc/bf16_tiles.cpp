// bf16 weights in a tiled layout of lora-kit's own, times fp32 rows, on CPUs that multiply bf16
// natively: AVX512-BF16 (`vdpbf16ps`) for a few rows, AMX tiles (`tdpbf16ps`) for many.
//
//   out[m, n] = bias[n] + sum_k round_bf16(x[m, k]) * w[n, k]     (sums and out in fp32)
//
// The layout, "tiles": w (N, K) held as (N / 16, K / 2, 16, 2): for each block of 16 outputs, for
// each pair of inputs k = 2p, 2p + 1, the 16 outputs' two weights side by side (64 bytes). That is
// at once
//   - what one `vdpbf16ps` takes: 16 fp32 sums += a pair of x (broadcast) times 16 weight pairs, so
//     one 64-byte load serves every row of x in the register block, with no horizontal sums, and
//   - AMX's B-tile layout (VNNI, "K / 2 rows of N pairs"): 16 consecutive pairs of one block are one
//     1 KiB tile, loaded with a 64-byte stride.
// So one copy of the weight serves the decode step (up to the op's max_dot_rows rows: bandwidth-bound) and
// the prefill (compute-bound: AMX), where oneDNN's packed layout needed oneDNN for both, and
// oneDNN pays a fixed ~15 us per call that dominates the embedded model's small products at one
// row (BENCHMARKS.md, issue 25: 37 us for a 192 x 576 weight, 5.9 GB/s).
//
// Roundings: x is rounded to bf16 on the way in (the instructions take bf16) and summed in fp32, as
// in oneDNN's bf16 products; the result stays fp32 where oneDNN rounds it to bf16. One rounding
// fewer, and it matters: rounded to bf16, the embedded model's two best first tokens for "What is
// the capital of France?" (logits 25.325 and 25.243 in fp32) tie, and the tie went to the wrong
// one ("L'Etoile, ..." instead of "Paris"). Both instructions treat denormal inputs as zero, as
// oneDNN's AMX kernels do.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LORA_KIT_TILES_DOT 1
#endif
#if defined(LORA_KIT_TILES_DOT) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define LORA_KIT_TILES_AMX 1
#endif

namespace {

constexpr int64_t kN = 16;  // outputs per block
constexpr int64_t kKAlign = 32;  // K must be a multiple of this: one AMX A-tile row (32 bf16)

#ifdef LORA_KIT_TILES_DOT

// x (M, K) fp32 -> xb (M, K) bf16 bits (round to nearest even), 32 at a time (K % 32 == 0).
void round_rows(const float* x, uint16_t* xb, int64_t count) {
  for (int64_t i = 0; i < count; i += 32) {
    const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i));
    _mm512_storeu_si512(xb + i, (__m512i)h);
  }
}

// out[0:16] = the fp32 sums plus bias. Kept in fp32 (oneDNN's bf16 products round them to bf16):
// one rounding fewer, and logits that keep their order where bf16 would tie them.
inline void emit(__m512 sum, const float* bias, float* out) {
  if (bias != nullptr) sum = _mm512_add_ps(sum, _mm512_loadu_ps(bias));
  _mm512_storeu_ps(out, sum);
}

// NB blocks of 16 outputs from block b0, times MR rows of xb (row stride K, as 32-bit pairs):
// every 64-byte weight load feeds MR `vdpbf16ps`, the x pair broadcast from memory.
template <int MR, int NB>
inline void dot_blocks(const uint16_t* xb, const uint16_t* w, const float* bias, float* out, int64_t K, int64_t N,
                       int64_t b0) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  const uint16_t* wb = w + b0 * K * kN;
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xb);
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wb + j * K * kN + p * 2 * kN);
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[r * pairs + p]));
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) {
      const int64_t n0 = (b0 + j) * kN;
      emit(acc[r][j], bias != nullptr ? bias + n0 : nullptr, out + r * N + n0);
    }
}

// All M rows times blocks [begin, end): NB blocks at a time, the rest by halves (so a short range
// still keeps several sums in flight), MR rows at a time while the blocks' weights stay in cache.
template <int MR, int NB>
void dot_range(const uint16_t* xb, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t K, int64_t N,
               int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + NB <= end; b += NB) {
    int64_t m = 0;
    for (; m + MR <= M; m += MR) dot_blocks<MR, NB>(xb + m * K, w, bias, out + m * N, K, N, b);
    for (; m < M; ++m) dot_blocks<1, NB>(xb + m * K, w, bias, out + m * N, K, N, b);
  }
  if constexpr (NB > 1) {
    if (b < end) dot_range<MR, NB / 2>(xb, w, bias, out, M, K, N, b, end);
  }
}

void dot_path(const uint16_t* xb, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t K, int64_t N) {
  const int64_t blocks = N / kN;
  // Register blocks (rows x output blocks), each weight load feeding MR rows; one row needs
  // several independent sums in flight to hide the instruction's latency.
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    if (M == 1) dot_range<1, 8>(xb, w, bias, out, M, K, N, begin, end);
    else if (M <= 2) dot_range<2, 4>(xb, w, bias, out, M, K, N, begin, end);
    else dot_range<4, 4>(xb, w, bias, out, M, K, N, begin, end);
  });
}

#endif  // LORA_KIT_TILES_DOT

#ifdef LORA_KIT_TILES_AMX

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this process may use AMX tile data (Linux asks each process to request it once).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqPerm = 0x1023, kXtileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0;
  }();
  return ok;
}

// Tiles: 0-3 sums (2 x 2 blocks of 16 x 16 fp32), 4-5 x (16 rows x 32 bf16), 6-7 w (16 pairs x 16).
void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Rows [m0, m0 + 16 * mt) x blocks [b0, b0 + nt) (mt, nt in {1, 2}) of xb (Mp, K) bf16 and the tiled w.
inline void amx_block(const uint16_t* xb, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t K,
                      int64_t N, int64_t m0, int mt, int64_t b0, int nt, float* scratch) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t xstride = K * 2, wstride = kN * 2 * 2;
  const uint16_t* x0 = xb + m0 * K;
  const uint16_t* x1 = x0 + 16 * K;
  const uint16_t* w0 = w + b0 * K * kN;
  const uint16_t* w1 = w0 + K * kN;
  for (int64_t k = 0; k < K; k += kKAlign) {
    _tile_loadd(4, x0 + k, xstride);
    _tile_loadd(6, w0 + k * kN, wstride);  // pairs k / 2 .. k / 2 + 15 of block b0
    _tile_dpbf16ps(0, 4, 6);
    if (nt == 2) {
      _tile_loadd(7, w1 + k * kN, wstride);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (mt == 2) {
      _tile_loadd(5, x1 + k, xstride);
      _tile_dpbf16ps(2, 5, 6);
      if (nt == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  for (int i = 0; i < mt; ++i) {
    for (int j = 0; j < nt; ++j) {
      switch (i * 2 + j) {  // tile numbers are immediates
        case 0: _tile_stored(0, scratch, 64); break;
        case 1: _tile_stored(1, scratch, 64); break;
        case 2: _tile_stored(2, scratch, 64); break;
        default: _tile_stored(3, scratch, 64); break;
      }
      const int64_t n0 = (b0 + j) * kN;
      const int64_t rows = std::min<int64_t>(16, M - (m0 + 16 * i));
      for (int64_t r = 0; r < rows; ++r) {
        emit(_mm512_loadu_ps(scratch + r * kN), bias != nullptr ? bias + n0 : nullptr, out + (m0 + 16 * i + r) * N + n0);
      }
    }
  }
}

// Threads take pairs of output blocks and run every row through them (each weight read once).
void amx_path(const uint16_t* xb, const uint16_t* w, const float* bias, float* out, int64_t M, int64_t K, int64_t N) {
  const int64_t blocks = N / kN, pairs = (blocks + 1) / 2;
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float scratch[16 * kN];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = 2 * p;
      const int nt = b0 + 1 < blocks ? 2 : 1;
      for (int64_t m0 = 0; m0 < M; m0 += 32) {
        amx_block(xb, w, bias, out, M, K, N, m0, M - m0 > 16 ? 2 : 1, b0, nt, scratch);
      }
    }
    _tile_release();
  });
}

#endif  // LORA_KIT_TILES_AMX

// Bit 1: the dot path was built (AVX512-BF16); bit 2: the AMX path was built and the OS grants it.
int64_t bf16_tiles_caps() {
  int64_t caps = 0;
#ifdef LORA_KIT_TILES_DOT
  caps |= 1;
#endif
#ifdef LORA_KIT_TILES_AMX
  if (amx_permitted()) caps |= 2;
#endif
  return caps;
}

// x (..., K) @ w^T + bias -> (..., N) fp32, w tiled (N / 16, K / 2, 16, 2) bf16, bias fp32 (N,); x is
// taken as fp32 and contiguous (converted if not). One op that allocates its output: the decode
// step calls it ~200 times, and each Python-side reshape, cast or allocation cost ~1 us per call.
// Up to max_dot_rows rows take the dot path, more the AMX path (where there is none: the dot path).
at::Tensor bf16_tiles_linear(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t max_dot_rows) {
  TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu(), "bf16_tiles_linear: CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1 && weight.dim() == 4, "bf16_tiles_linear: x (..., K), weight (N / 16, K / 2, 16, 2)");
  const int64_t K = x_in.size(-1), N = weight.size(0) * kN;
  TORCH_CHECK(K % kKAlign == 0 && weight.size(1) == K / 2 && weight.size(2) == kN && weight.size(3) == 2,
              "bf16_tiles_linear: shapes do not match (K a multiple of 32, N of 16)");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "bf16_tiles_linear: weight must be a contiguous bfloat16");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bf16_tiles_linear: bias must be a contiguous float32 (N,)");
    b = bias->data_ptr<float>();
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty(sizes, x.options());
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
#ifdef LORA_KIT_TILES_DOT
  if (M == 0 || N == 0) return out;
  const bool amx = M > max_dot_rows && (bf16_tiles_caps() & 2);
  const int64_t rows = amx ? (M + 15) / 16 * 16 : M;  // AMX reads whole tiles: zero rows below
  std::vector<uint16_t> xb(static_cast<size_t>(rows * K), 0);
  round_rows(x.data_ptr<float>(), xb.data(), M * K);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
#ifdef LORA_KIT_TILES_AMX
  if (amx) {
    amx_path(xb.data(), w, b, out.data_ptr<float>(), M, K, N);
    return out;
  }
#endif
  dot_path(xb.data(), w, b, out.data_ptr<float>(), M, K, N);
  return out;
#else
  TORCH_CHECK(false, "bf16_tiles_linear: built without AVX512-BF16 (see bf16_tiles_caps)");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lora_kit, m) {
  m.def("bf16_tiles_caps() -> int", &bf16_tiles_caps);
  m.def("bf16_tiles_linear(Tensor x, Tensor weight, Tensor? bias, int max_dot_rows) -> Tensor");
  m.impl("bf16_tiles_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_tiles_linear));
}
