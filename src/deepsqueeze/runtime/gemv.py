"""``gemv``: deepsqueeze's own kernel for packed 4- and 8-bit Linear layers on a few rows (decoding at batch 1).

PyTorch's weight-only CPU kernels are far slower than fp32 at one row on AVX2 (``_weight_int4pack_mm_for_cpu``:
2.7 ms for a 1536 x 576 weight where fp32 takes 0.2 ms, 2 threads), so a packed model decoded slower than its
float original. This kernel reads the packed codes as they are stored (two 4-bit codes per byte, low nibble
first; or one 8-bit code per byte), widens 32 codes at a time to floats with AVX2 and multiplies them into the
input rows (FMA), one group at a time:

    y[m, n] = sum_g s[n, g] * sum_{k in g} q[n, k] x[m, k]  -  sum_g s[n, g] z[n, g] sum_{k in g} x[m, k]

Output rows are split across threads (``at::parallel_for``). Up to 32 input rows share each decoded block; one
input row (decoding) takes four output rows at a time, so their accumulations hide each other's FMA latency;
groups must be whole blocks of 32 inputs. The C++ source is compiled once per machine by
``torch.utils.cpp_extension`` (needs a C++ compiler and ninja) into torch's extension folder
(``TORCH_EXTENSIONS_DIR``); where that fails, or the CPU lacks AVX2/FMA, the kernel is unavailable, says why,
and the other kernels run.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GEMV_MAX_ROWS", "gemv_unavailable", "run_gemv"]

GEMV_MAX_ROWS = 32
_VERSION = 3
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

static inline __m256 widen(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// 32 codes of one row from k on, as four vectors of 8 floats
static inline void decode32(const uint8_t* row, int64_t k, int64_t bits, __m256& w0, __m256& w1, __m256& w2,
                            __m256& w3) {
  if (bits == 4) {
    const __m128i low = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128((const __m128i*)(row + k / 2));
    __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);
    w0 = widen(c0); w1 = widen(_mm_srli_si128(c0, 8)); w2 = widen(c1); w3 = widen(_mm_srli_si128(c1, 8));
  } else {
    const uint8_t* p = row + k;
    w0 = widen(_mm_loadl_epi64((const __m128i*)p)); w1 = widen(_mm_loadl_epi64((const __m128i*)(p + 8)));
    w2 = widen(_mm_loadl_epi64((const __m128i*)(p + 16))); w3 = widen(_mm_loadl_epi64((const __m128i*)(p + 24)));
  }
}

// One input row (decoding at batch 1), R output rows at a time: their R accumulation chains interleave, so the
// FMA latency is hidden (one row alone waits on its own chain 4 times per 32 codes).
template <int R>
static inline void rows_m1(const float* xp, const uint8_t* cp, const float* sp, const float* zp, const float* xsp,
                           float* yp, int64_t n, int64_t G, int64_t group, int64_t bits, int64_t row_bytes) {
  __m256 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      for (int r = 0; r < R; ++r) {
        __m256 w0, w1, w2, w3;
        decode32(cp + (n + r) * row_bytes, k, bits, w0, w1, w2, w3);
        __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + k), acc[r]);
        a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + k + 8), a);
        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + k + 16), a);
        acc[r] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + k + 24), a);
      }
    }
    for (int r = 0; r < R; ++r) tot[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(sp[(n + r) * G + g]), tot[r]);
  }
  for (int r = 0; r < R; ++r) {
    float v = hsum(tot[r]);
    for (int64_t g = 0; g < G; ++g) v -= zp[(n + r) * G + g] * xsp[g];
    yp[n + r] = v;
  }
}

torch::Tensor packed_matmul(torch::Tensor x, torch::Tensor codes, torch::Tensor scale, torch::Tensor zero_scale,
                            int64_t bits, int64_t group) {
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = K / group, row_bytes = codes.size(1);
  TORCH_CHECK(M <= 32 && K % 32 == 0 && group % 32 == 0 && (bits == 4 || bits == 8), "packed_matmul: bad shape");
  auto y = torch::empty({M, N}, x.options());
  auto xs = torch::zeros({M, G}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsp[m * G + k / group] += xp[m * K + k];
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (M == 1) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) rows_m1<4>(xp, cp, sp, zp, xsp, yp, n, G, group, bits, row_bytes);
      for (; n < n1; ++n) rows_m1<1>(xp, cp, sp, zp, xsp, yp, n, G, group, bits, row_bytes);
      return;
    }
    __m256 acc[32], tot[32];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = cp + n * row_bytes;
      for (int64_t m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps();
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
          __m256 w0, w1, w2, w3;
          decode32(row, k, bits, w0, w1, w2, w3);
          for (int64_t m = 0; m < M; ++m) {
            const float* xm = xp + m * K + k;
            __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[m]);
            a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a);
            a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
            acc[m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a);
          }
        }
        const __m256 s = _mm256_set1_ps(sp[n * G + g]);
        for (int64_t m = 0; m < M; ++m) tot[m] = _mm256_fmadd_ps(acc[m], s, tot[m]);
      }
      for (int64_t m = 0; m < M; ++m) {
        float v = hsum(tot[m]);
        for (int64_t g = 0; g < G; ++g) v -= zp[n * G + g] * xsp[m * G + g];
        yp[m * N + n] = v;
      }
    }
  });
  return y;
}
"""
_state: dict[str, Any] = {}


def _build() -> Any:
    import os

    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"the CPU offers {capability}, the kernel needs AVX2 and FMA")
    os.environ.setdefault("MAX_JOBS", "2")
    try:
        import ninja  # the PyPI binary, when the venv's bin folder is not on PATH

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except (ImportError, AttributeError):
        pass
    return load_inline(name=f"deepsqueeze_gemv_v{_VERSION}", cpp_sources=[_SOURCE], functions=["packed_matmul"],
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)


def gemv_unavailable() -> str | None:
    """None where the kernel runs on this machine (built on first call, then loaded), else why not."""
    if "module" not in _state:
        try:
            _state["module"], _state["reason"] = _build(), None
        except Exception as exc:  # noqa: BLE001 - any build failure: the kernel is unavailable, the rest runs
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _state["module"], _state["reason"] = None, f"the gemv kernel cannot be built here: {first[:160]}"
    return _state["reason"]


def run_gemv(x2: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero_scale: torch.Tensor, bits: int,
             group: int) -> torch.Tensor:
    """``(M, N)`` outputs for float32 inputs ``x2`` (M <= 32, K) and packed ``codes`` (N, K * bits / 8) with
    (N, K / group) ``scale`` and ``zero_point * scale``; :func:`gemv_unavailable` must have said None."""
    return _state["module"].packed_matmul(x2.contiguous(), codes, scale, zero_scale, bits, group)
