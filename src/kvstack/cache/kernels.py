"""Fused CPU kernels for decoding over packed KV codes (compiled on first use, optional).

Decoding one token reads every cached entry once. The PyTorch path (:meth:`QuantizedRegion.attend_one`)
decodes a block of codes to float32 and multiplies; these kernels instead unpack each token's codes
into registers, apply its group's scale and zero point and take the dot products directly, so no
decoded block exists at all and the codes are read once:

* :func:`packed_scores`: ``q . k_t`` for every encoded key ``t`` and every query head of its group;
* :func:`packed_weighted_values`: ``sum_t w_t v_t`` over the encoded values.

They are compiled with ``torch.utils.cpp_extension.load_inline`` (g++ with OpenMP) the first time they
are needed and cached by PyTorch (``TORCH_EXTENSIONS_DIR``). Where no compiler is available, or with
``KVSTACK_KERNELS=0``, :func:`available` is False and kvstack uses the PyTorch path, which computes the
same thing block by block.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch

__all__ = ["available", "packed_scores", "packed_weighted_values"]

ENV = "KVSTACK_KERNELS"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

// Unpack token t's D codes (bits per code) into floats.
static inline void unpack_row(const uint8_t* row, int64_t D, int64_t bits, float* out) {
  if (bits == 8) {
    for (int64_t c = 0; c < D; ++c) out[c] = (float)row[c];
  } else if (bits == 4) {
    for (int64_t i = 0; i < D / 2; ++i) { uint8_t b = row[i]; out[2 * i] = (float)(b & 15); out[2 * i + 1] = (float)(b >> 4); }
  } else {
    for (int64_t i = 0; i < D / 4; ++i) {
      uint8_t b = row[i];
      out[4 * i] = (float)(b & 3); out[4 * i + 1] = (float)((b >> 2) & 3);
      out[4 * i + 2] = (float)((b >> 4) & 3); out[4 * i + 3] = (float)(b >> 6);
    }
  }
}

// Reconstruct token t: meta rows hold per-channel (along_tokens) or per-channel-group (per token) values.
static inline void dequant_row(const float* codes, const c10::Half* scale, const c10::Half* zero,
                               int64_t D, int64_t width, bool along_tokens, float* out) {
  if (along_tokens) {
    for (int64_t c = 0; c < D; ++c) out[c] = (float)zero[c] + (float)scale[c] * codes[c];
  } else {
    for (int64_t c = 0; c < D; ++c) out[c] = (float)zero[c / width] + (float)scale[c / width] * codes[c];
  }
}

// scores[b, h, g, t] = sum_c query[b, h, g, c] * k[b, h, t, c] for t < N.
torch::Tensor packed_scores(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, torch::Tensor query,
                            int64_t N, int64_t bits, int64_t group, bool along_tokens) {
  const int64_t B = codes.size(0), H = codes.size(1), D = query.size(3), G = query.size(2);
  auto scores = torch::empty({B, H, G, N}, query.options());
  const int64_t block = 256;
  const int64_t blocks = (N + block - 1) / block;
  auto cs = codes.strides(); auto ss = scale.strides();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scale.data_ptr<c10::Half>(); const c10::Half* zp = zero.data_ptr<c10::Half>();
  const float* qp = query.data_ptr<float>(); float* op = scores.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(D), key(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, blk = task % blocks, b = bh / H, h = bh % H;
      const float* q = qp + (b * H + h) * G * D;
      float* out = op + (b * H + h) * G * N;
      for (int64_t t = blk * block; t < std::min(N, (blk + 1) * block); ++t) {
        unpack_row(cp + b * cs[0] + h * cs[1] + t * cs[2], D, bits, tmp.data());
        const int64_t m = along_tokens ? t / group : t;
        const int64_t off = b * ss[0] + h * ss[1] + m * ss[2];
        dequant_row(tmp.data(), sp + off, zp + off, D, group, along_tokens, key.data());
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.f;
          const float* qg = q + g * D;
          for (int64_t c = 0; c < D; ++c) acc += qg[c] * key[c];
          out[g * N + t] = acc;
        }
      }
    }
  });
  return scores;
}

// partial[b, h, blk, g, c] = sum over t in block blk of weights[b, h, g, t] * v[b, h, t, c].
torch::Tensor packed_weighted_values(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                                     torch::Tensor weights, int64_t N, int64_t bits, int64_t group,
                                     bool along_tokens) {
  const int64_t B = codes.size(0), H = codes.size(1), G = weights.size(2);
  const int64_t D = codes.size(3) * 8 / bits;
  const int64_t block = 512;
  const int64_t blocks = (N + block - 1) / block;
  auto partial = torch::zeros({B, H, blocks, G, D}, weights.options());
  auto cs = codes.strides(); auto ss = scale.strides(); auto ws = weights.strides();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::Half* sp = scale.data_ptr<c10::Half>(); const c10::Half* zp = zero.data_ptr<c10::Half>();
  const float* wp = weights.data_ptr<float>(); float* pp = partial.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(D), value(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, blk = task % blocks, b = bh / H, h = bh % H;
      float* acc = pp + ((b * H + h) * blocks + blk) * G * D;
      for (int64_t t = blk * block; t < std::min(N, (blk + 1) * block); ++t) {
        unpack_row(cp + b * cs[0] + h * cs[1] + t * cs[2], D, bits, tmp.data());
        const int64_t m = along_tokens ? t / group : t;
        const int64_t off = b * ss[0] + h * ss[1] + m * ss[2];
        dequant_row(tmp.data(), sp + off, zp + off, D, group, along_tokens, value.data());
        for (int64_t g = 0; g < G; ++g) {
          const float w = wp[b * ws[0] + h * ws[1] + g * ws[2] + t * ws[3]];
          float* a = acc + g * D;
          for (int64_t c = 0; c < D; ++c) a[c] += w * value[c];
        }
      }
    }
  });
  return partial.sum(2);
}
"""


@functools.lru_cache(maxsize=1)
def _module() -> Any:
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name="kvstack_packed_kernels",
        cpp_sources=_SOURCE,
        functions=["packed_scores", "packed_weighted_values"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels are enabled (``KVSTACK_KERNELS`` is not ``0``) and compile on this machine."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    try:
        _module()
    except Exception as err:  # no compiler, no headers: the PyTorch path computes the same thing
        print(f"kvstack: fused decoding kernels unavailable ({type(err).__name__}); using the PyTorch path",
              file=sys.stderr)
        return False
    return True


def packed_scores(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, query: torch.Tensor, length: int, bits: int,
    group: int, along_tokens: bool,
) -> torch.Tensor:
    """``[B, H, G, N]`` float32 dot products of ``query`` ``[B, H, G, D]`` with the first ``N`` packed keys.

    ``codes`` ``[B, H, capacity, D * bits / 8]`` uint8 (row-contiguous); ``scale``/``zero`` float16 rows
    per ``group`` tokens (``along_tokens``) or per token with one column per ``group`` channels.
    """
    return _module().packed_scores(codes, scale, zero, query.contiguous(), length, bits, group, along_tokens)


def packed_weighted_values(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weights: torch.Tensor, length: int, bits: int,
    group: int, along_tokens: bool,
) -> torch.Tensor:
    """``[B, H, G, D]`` float32: ``weights`` ``[B, H, G, N]`` applied to the first ``N`` packed values."""
    return _module().packed_weighted_values(codes, scale, zero, weights, length, bits, group, along_tokens)
