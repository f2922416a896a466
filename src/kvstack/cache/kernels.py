"""Fused CPU kernels: decoding over packed KV codes, and paged attention (compiled on first use, optional).

Decoding one token reads every cached entry once. The PyTorch path (:meth:`QuantizedRegion.attend_one`)
decodes a block of codes to float32 and multiplies; these kernels instead unpack each token's codes
into registers, apply its group's scale and zero point and take the dot products directly, so no
decoded block exists at all and the codes are read once:

* :func:`packed_scores`: ``q . k_t`` for every encoded key ``t`` and every query head of its group;
* :func:`packed_weighted_values`: ``sum_t w_t v_t`` over the encoded values.

H2O's and Scissorhands' column statistics have one as well: :func:`attention_with_column_sums` computes a
chunk's causal attention one tile of query rows at a time, keeping each tile's full rows of weights in cache
while it takes the softmax, the output and the per-entry column sums (and below-mean counts) in one pass, so
the statistics cost no second pass over the scores.

The serving engine's paged attention (:func:`kvstack.engine.paged_attention.paged_attention`) has one too:
:func:`paged_attention_forward` attends packed query tokens of many sequences over the float32 KV pool,
reading each key and value row in place through the block tables (no gathered copy of a sequence's KV), one
task per (token, KV head) so the query heads of a GQA group share every row read.

They are compiled with ``torch.utils.cpp_extension.load_inline`` (g++ with OpenMP) the first time they
are needed on a machine, into a directory under ``TORCH_EXTENSIONS_DIR`` (or PyTorch's default) that every
virtual environment with the same python, torch and CPU shares (:func:`build_directory`); after that each
process only imports the finished library. Where no compiler is available, or with ``KVSTACK_KERNELS=0``,
:func:`available` is False and kvstack uses the PyTorch path, which computes the same thing block by block.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "attention_with_column_sums", "available", "key_bound_top_pages", "lowrank_top_pages", "packed_scores",
    "packed_weighted_values", "page_cache_read", "paged_attention_forward", "read_file_blocks",
    "selected_page_attention",
]

ENV = "KVSTACK_KERNELS"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <sys/uio.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <unistd.h>

// Unpack one token's D codes (2, 4 or 8 bits each, consecutive codes from the lowest bits) into floats.
static inline void unpack_row(const uint8_t* __restrict row, int64_t D, int64_t bits, float* __restrict out) {
  if (bits == 8) {
    for (int64_t c = 0; c < D; ++c) out[c] = (float)row[c];
  } else if (bits == 4) {
    for (int64_t i = 0; i < D / 2; ++i) {
      const uint8_t b = row[i];
      out[2 * i] = (float)(b & 15); out[2 * i + 1] = (float)(b >> 4);
    }
  } else {
    for (int64_t i = 0; i < D / 4; ++i) {
      const uint8_t b = row[i];
      out[4 * i] = (float)(b & 3); out[4 * i + 1] = (float)((b >> 2) & 3);
      out[4 * i + 2] = (float)((b >> 4) & 3); out[4 * i + 3] = (float)(b >> 6);
    }
  }
}

// scores[b, h, g, t] = q_g . (zero + scale * code_t) for the first N tokens.
// scale/zero (float32): [B, H, N/group, D] when groups run along tokens, [B, H, N, D/group] otherwise.
torch::Tensor packed_scores(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero, torch::Tensor query,
                            int64_t N, int64_t bits, int64_t group, bool along_tokens) {
  const int64_t B = codes.size(0), H = codes.size(1), G = query.size(2), D = query.size(3);
  auto scores = torch::empty({B, H, G, N}, query.options());
  const int64_t block = along_tokens ? std::max<int64_t>(group, (256 / group) * group) : 256;
  const int64_t blocks = (N + block - 1) / block;
  const auto cs = codes.strides(); const auto ss = scale.strides();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* zp = zero.data_ptr<float>();
  const float* qp = query.data_ptr<float>(); float* op = scores.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> codes_f(D), qs(G * D), qz(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, blk = task % blocks, b = bh / H, h = bh % H;
      const float* q = qp + (b * H + h) * G * D;
      float* out = op + (b * H + h) * G * N;
      const int64_t stop = std::min(N, (blk + 1) * block);
      for (int64_t t = blk * block; t < stop; ++t) {
        if (along_tokens && (t % group == 0 || t == blk * block)) {  // fold this group's scale into the queries
          const float* s = sp + b * ss[0] + h * ss[1] + (t / group) * ss[2];
          const float* z = zp + b * ss[0] + h * ss[1] + (t / group) * ss[2];
          for (int64_t g = 0; g < G; ++g) {
            float acc = 0.f;
            for (int64_t c = 0; c < D; ++c) { qs[g * D + c] = q[g * D + c] * s[c]; acc += q[g * D + c] * z[c]; }
            qz[g] = acc;
          }
        }
        unpack_row(cp + b * cs[0] + h * cs[1] + t * cs[2], D, bits, codes_f.data());
        const float* cf = codes_f.data();
        if (along_tokens) {
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qs.data() + g * D;
            float acc = 0.f;
            for (int64_t c = 0; c < D; ++c) acc += qg[c] * cf[c];
            out[g * N + t] = acc + qz[g];
          }
        } else {
          const float* s = sp + b * ss[0] + h * ss[1] + t * ss[2];
          const float* z = zp + b * ss[0] + h * ss[1] + t * ss[2];
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = q + g * D;
            float total = 0.f;
            for (int64_t j = 0; j < D / group; ++j) {
              float dot = 0.f, sum = 0.f;
              for (int64_t c = j * group; c < (j + 1) * group; ++c) { dot += qg[c] * cf[c]; sum += qg[c]; }
              total += s[j] * dot + z[j] * sum;
            }
            out[g * N + t] = total;
          }
        }
      }
    }
  });
  return scores;
}

// sum over t < N of weights[b, h, g, t] * (zero + scale * code_t), as [B, H, G, D].
torch::Tensor packed_weighted_values(torch::Tensor codes, torch::Tensor scale, torch::Tensor zero,
                                     torch::Tensor weights, int64_t N, int64_t bits, int64_t group,
                                     bool along_tokens) {
  const int64_t B = codes.size(0), H = codes.size(1), G = weights.size(2);
  const int64_t D = codes.size(3) * 8 / bits;
  const int64_t block = along_tokens ? std::max<int64_t>(group, (512 / group) * group) : 512;
  const int64_t blocks = (N + block - 1) / block;
  auto partial = torch::zeros({B, H, blocks, G, D}, weights.options());
  const auto cs = codes.strides(); const auto ss = scale.strides(); const auto ws = weights.strides();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>(); const float* zp = zero.data_ptr<float>();
  const float* wp = weights.data_ptr<float>(); float* pp = partial.data_ptr<float>();
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> codes_f(D), offset(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, blk = task % blocks, b = bh / H, h = bh % H;
      float* __restrict acc = pp + ((b * H + h) * blocks + blk) * G * D;
      std::fill(offset.begin(), offset.end(), 0.f);
      const int64_t stop = std::min(N, (blk + 1) * block);
      for (int64_t t = blk * block; t < stop; ++t) {
        unpack_row(cp + b * cs[0] + h * cs[1] + t * cs[2], D, bits, codes_f.data());
        const float* cf = codes_f.data();
        const float* s = sp + b * ss[0] + h * ss[1] + (along_tokens ? t / group : t) * ss[2];
        const float* z = zp + b * ss[0] + h * ss[1] + (along_tokens ? t / group : t) * ss[2];
        for (int64_t g = 0; g < G; ++g) {
          const float w = wp[b * ws[0] + h * ws[1] + g * ws[2] + t * ws[3]];
          float* __restrict a = acc + g * D;
          float* __restrict o = offset.data() + g * D;
          if (along_tokens) {
            for (int64_t c = 0; c < D; ++c) { a[c] += (w * s[c]) * cf[c]; o[c] += w * z[c]; }
          } else {
            for (int64_t j = 0; j < D / group; ++j) {
              const float ws_ = w * s[j];
              for (int64_t c = j * group; c < (j + 1) * group; ++c) a[c] += ws_ * cf[c];
              o[j * group] += w * z[j];
            }
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // add the zero points
        float* a = acc + g * D; const float* o = offset.data() + g * D;
        if (along_tokens) { for (int64_t c = 0; c < D; ++c) a[c] += o[c]; }
        else {
          for (int64_t j = 0; j < D / group; ++j)
            for (int64_t c = j * group; c < (j + 1) * group; ++c) a[c] += o[j * group];
        }
      }
    }
  });
  return partial.sum(2);
}

// Paged attention of packed query tokens over a KV pool read in place through block tables.
// query [T, Hq, D] float32 (contiguous); kv [num_blocks, L, 2, H, block_size, D] float32 (last dim contiguous);
// tables [S, max_blocks] int64; token_seq [T]: the sequence (row of tables) of each query token;
// token_pos [T]: its position, so it sees the keys at positions 0..token_pos. Returns [T, Hq, D].
// One task per (token, KV head): the G query heads of the group share every key and value row read.
torch::Tensor paged_attention_forward(torch::Tensor query, torch::Tensor kv, int64_t layer, torch::Tensor tables,
                                      torch::Tensor token_seq, torch::Tensor token_pos, double scaling) {
  const int64_t T = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t H = kv.size(3), BS = kv.size(4), G = Hq / H, MB = tables.size(1);
  auto out = torch::empty_like(query);
  const auto ks = kv.strides();
  const float* kvp = kv.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* seqp = token_seq.data_ptr<int64_t>();
  const int64_t* posp = token_pos.data_ptr<int64_t>();
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = (float)scaling;
  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / H, h = task % H, n = posp[t] + 1;
      const int64_t* table = tp + seqp[t] * MB;
      const float* __restrict q = qp + (t * Hq + h * G) * D;
      scores.resize(G * n);
      float* __restrict sc = scores.data();
      for (int64_t b = 0; b * BS < n; ++b) {
        const float* kb = kvp + table[b] * ks[0] + layer * ks[1] + h * ks[3];
        const int64_t stop = std::min(BS, n - b * BS);
        for (int64_t s = 0; s < stop; ++s) {
          const float* __restrict k = kb + s * ks[4];
          for (int64_t g = 0; g < G; ++g) {
            const float* __restrict qg = q + g * D;
            float dot = 0.f;
            for (int64_t c = 0; c < D; ++c) dot += qg[c] * k[c];
            sc[g * n + b * BS + s] = dot * scale;
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* row = sc + g * n;
        float mx = row[0];
        for (int64_t p = 1; p < n; ++p) mx = std::max(mx, row[p]);
        float sum = 0.f;
        for (int64_t p = 0; p < n; ++p) { row[p] = std::exp(row[p] - mx); sum += row[p]; }
        const float inv = 1.f / sum;
        for (int64_t p = 0; p < n; ++p) row[p] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b * BS < n; ++b) {
        const float* vb = kvp + table[b] * ks[0] + layer * ks[1] + ks[2] + h * ks[3];
        const int64_t stop = std::min(BS, n - b * BS);
        for (int64_t s = 0; s < stop; ++s) {
          const float* __restrict v = vb + s * ks[4];
          for (int64_t g = 0; g < G; ++g) {
            const float w = sc[g * n + b * BS + s];
            float* __restrict a = acc.data() + g * D;
            for (int64_t c = 0; c < D; ++c) a[c] += w * v[c];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(acc.data() + g * D, acc.data() + (g + 1) * D, op + (t * Hq + h * G + g) * D);
    }
  });
  return out;
}

// exp(x) for x <= 0 (softmax exponents) in plain arithmetic, so that the loops calling it vectorise:
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor-like minimax polynomial (relative error about
// 1e-7), and 2^n written into the exponent bits. Below -87 the result is clamped at about 1.6e-38 (float's floor).
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return p * two_to_n;
}

static float row_max(const float* __restrict row, int64_t n) {
  float best = row[0];
  for (int64_t p = 1; p < n; ++p) best = std::max(best, row[p]);
  return best;
}

// row[p] = exp(row[p] * scale - shift) for p < n; returns their sum.
static float row_exp(float* __restrict row, int64_t n, float scale, float shift) {
  float sum = 0.f;
  for (int64_t p = 0; p < n; ++p) {
    const float e = exp_nonpositive(row[p] * scale - shift);
    row[p] = e;
    sum += e;
  }
  return sum;
}

// Normalise a row of weights and add it to the column sums.
static void row_normalise_accumulate(float* __restrict row, float* __restrict colsum, int64_t n, float inv_sum) {
  for (int64_t p = 0; p < n; ++p) {
    row[p] *= inv_sum;
    colsum[p] += row[p];
  }
}

static void row_count_below(const float* __restrict row, float* __restrict counts, int64_t n, float threshold) {
  for (int64_t p = 0; p < n; ++p) counts[p] += row[p] < threshold ? 1.f : 0.f;
}

// Causal grouped-query attention of a chunk, the last Q of L entries (query row i sees entries 0 .. L - Q + i),
// with the attention each entry receives summed over the chunk's queries and the G query heads of its KV head.
// query [B, Hq, Q, D] float32 contiguous; keys, values [B, H, L, D] float32 (rows contiguous).
// Returns {output [B, Hq, Q, D], colsum [B, H, L]} and, with want_below, below [B, H, L]: how many of those
// (query, head) rows gave the entry less than the mean weight 1 / (entries the row sees).
// One task per (batch, KV head, tile of rows_per_tile query rows): the tile's G * rows scores are taken with one
// matrix product, its softmax, column sums and counts in one pass while the rows are in cache, then its output.
// Each thread accumulates into its own [B * H, L] sums, added up at the end.
std::vector<torch::Tensor> attention_with_column_sums(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                                                      double scaling, bool want_below, int64_t rows_per_tile) {
  const int64_t B = query.size(0), Hq = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t H = keys.size(1), L = keys.size(2), G = Hq / H, past = L - Q;
  const int64_t R = rows_per_tile, tiles = (Q + R - 1) / R, tasks = B * H * tiles;
  const int64_t threads = at::get_num_threads();
  auto grouped_query = query.view({B, H, G, Q, D});
  auto out = torch::empty({B, H, G, Q, D}, query.options());
  auto colsum_parts = torch::zeros({threads, B * H, L}, query.options());
  auto below_parts = want_below ? torch::zeros({threads, B * H, L}, query.options()) : torch::Tensor();
  const float scale = (float)scaling;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t thread = at::get_thread_num();
    for (int64_t task = begin; task < end; ++task) {
      // Tiles in the order 0, T-1, 1, T-2, ...: short (early) and long (late) causal rows alternate, so the
      // contiguous task ranges the threads receive hold about the same work.
      const int64_t bh = task % (B * H), k = task / (B * H), b = bh / H, h = bh % H;
      const int64_t tile = k % 2 == 0 ? k / 2 : tiles - 1 - k / 2;
      const int64_t r0 = tile * R, rows = std::min(R, Q - r0), visible = past + r0 + rows;
      auto scores = at::matmul(grouped_query[b][h].narrow(1, r0, rows),
                               keys[b][h].narrow(0, 0, visible).t()).contiguous();  // [G, rows, visible]
      float* sp = scores.data_ptr<float>();
      float* colsum = colsum_parts.data_ptr<float>() + (thread * B * H + bh) * L;
      float* below = want_below ? below_parts.data_ptr<float>() + (thread * B * H + bh) * L : nullptr;
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < rows; ++i) {
          float* row = sp + (g * rows + i) * visible;
          const int64_t n = past + r0 + i + 1;
          const float shift = row_max(row, n) * scale;
          const float sum = row_exp(row, n, scale, shift);
          row_normalise_accumulate(row, colsum, n, 1.f / sum);
          if (below != nullptr) row_count_below(row, below, n, 1.f / (float)n);
          std::fill(row + n, row + visible, 0.f);
        }
      }
      out[b][h].narrow(1, r0, rows).copy_(at::matmul(scores, values[b][h].narrow(0, 0, visible)));
    }
  });
  std::vector<torch::Tensor> result = {out.view({B, Hq, Q, D}), colsum_parts.sum(0).view({B, H, L})};
  if (want_below) result.push_back(below_parts.sum(0).view({B, H, L}));
  return result;
}
// A decoding step of a page-reading policy (Quest, InfLLM): each (sequence, KV head) attends over the k pages
// its policy chose, read in place, and over its R resident entries (sinks, window, the newest entries).
// query [B, Hq, D]; key_pages, value_pages [N, Hp, P, D] (rows contiguous): page i of KV head h is
// [i, h] when Hp == H (a paged pool's blocks hold every head), [i, 0] when Hp == 1 (slots of one head each);
// page_index [B, H, k] int64; resident keys and values [B, H, R, D] (rows contiguous), of which sequence b
// reads the first resident_counts[b] (int64 [B]). Softmax order does not matter: keys carry RoPE.
torch::Tensor selected_page_attention(torch::Tensor query, torch::Tensor key_pages, torch::Tensor value_pages,
                                      torch::Tensor page_index, torch::Tensor resident_keys,
                                      torch::Tensor resident_values, torch::Tensor resident_counts,
                                      double scaling) {
  const int64_t B = query.size(0), Hq = query.size(1), D = query.size(2);
  const int64_t H = page_index.size(1), k = page_index.size(2), P = key_pages.size(2), R = resident_keys.size(2);
  const int64_t G = Hq / H;
  const int64_t* counts = resident_counts.data_ptr<int64_t>();
  auto out = torch::empty_like(query);
  const float* kpages = key_pages.data_ptr<float>();
  const float* vpages = value_pages.data_ptr<float>();
  const auto kps = key_pages.strides(), vps = value_pages.strides();
  const bool per_head = key_pages.size(1) > 1;
  const int64_t* index = page_index.data_ptr<int64_t>();
  const auto rks = resident_keys.strides(), rvs = resident_values.strides();
  const float* rk = resident_keys.data_ptr<float>();
  const float* rv = resident_values.data_ptr<float>();
  const float* qp = query.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float scale = (float)scaling;
  // One task per query head: a GQA group's query heads share the rows they read through the cache, and
  // a single sequence's few KV heads still spread over the threads.
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(k * P + R), acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hq, h = (task % Hq) / G, rb = std::min(R, counts[b]), n = k * P + rb;
      const int64_t* chosen = index + (b * H + h) * k;
      const float* __restrict q = qp + task * D;
      float* __restrict sc = scores.data();
      auto score_row = [&](const float* __restrict key, int64_t t) {
        float dot = 0.f;
        for (int64_t c = 0; c < D; ++c) dot += q[c] * key[c];
        sc[t] = dot * scale;
      };
      const int64_t kh = per_head ? h * kps[1] : 0, vh = per_head ? h * vps[1] : 0;
      for (int64_t j = 0; j < k; ++j)
        for (int64_t s = 0; s < P; ++s) score_row(kpages + chosen[j] * kps[0] + kh + s * kps[2], j * P + s);
      for (int64_t r = 0; r < rb; ++r) score_row(rk + b * rks[0] + h * rks[1] + r * rks[2], k * P + r);
      float mx = sc[0];
      for (int64_t t = 1; t < n; ++t) mx = std::max(mx, sc[t]);
      float sum = 0.f;
      for (int64_t t = 0; t < n; ++t) { sc[t] = std::exp(sc[t] - mx); sum += sc[t]; }
      const float inv = 1.f / sum;
      std::fill(acc.begin(), acc.end(), 0.f);
      float* __restrict a = acc.data();
      auto add_row = [&](const float* __restrict value, int64_t t) {
        const float w = sc[t] * inv;
        for (int64_t c = 0; c < D; ++c) a[c] += w * value[c];
      };
      for (int64_t j = 0; j < k; ++j)
        for (int64_t s = 0; s < P; ++s) add_row(vpages + chosen[j] * vps[0] + vh + s * vps[2], j * P + s);
      for (int64_t r = 0; r < rb; ++r) add_row(rv + b * rvs[0] + h * rvs[1] + r * rvs[2], k * P + r);
      std::copy(acc.begin(), acc.end(), op + task * D);
    }
  });
  return out;
}

// The k largest of score[0 .. P) (ties to the lower index), in no particular order, into out.
static void top_k_indices(const float* score, std::vector<int64_t>& order, int64_t k, int64_t* out) {
  std::iota(order.begin(), order.end(), 0);
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t a, int64_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  std::copy(order.begin(), order.begin() + k, out);
}

// Pages scored per task of the selection kernels: a task's pages of one (sequence, KV head), so that a few KV
// heads spread evenly over the threads (three heads on two threads would leave one thread a third idle).
static constexpr int64_t SCORE_CHUNK = 64;

// The scores [B * H, P] of every page, chunk by chunk in parallel (score_pages(task, first, stop, out) fills
// out[first .. stop)), then each (sequence, head)'s k best into out [B * H, k].
template <typename ScorePages>
static void top_pages_in_parallel(int64_t tasks, int64_t P, int64_t k, int64_t* out, const ScorePages& score_pages) {
  std::vector<float> score(tasks * P);
  const int64_t chunks = (P + SCORE_CHUNK - 1) / SCORE_CHUNK;
  at::parallel_for(0, tasks * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t task = i / chunks, first = (i % chunks) * SCORE_CHUNK, stop = std::min(P, first + SCORE_CHUNK);
      score_pages(task, first, stop, score.data() + task * P);
    }
  });
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(P);
    for (int64_t task = begin; task < end; ++task) top_k_indices(score.data() + task * P, order, k, out + task * k);
  });
}

static void key_bound_page_scores(const float* __restrict q, const float* __restrict lo, const float* __restrict hi,
                                  int64_t G, int64_t D, int64_t first, int64_t stop, float* __restrict score) {
  for (int64_t p = first; p < stop; ++p) {
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      const float* __restrict qg = q + g * D;
      float bound = 0.f;
      for (int64_t d = 0; d < D; ++d) bound += std::max(qg[d] * lo[p * D + d], qg[d] * hi[p * D + d]);
      best = std::max(best, bound);
    }
    score[p] = best;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float horizontal_max(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps(half, half, 1)));
}

static inline float horizontal_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)));
}

// The key bounds of N query heads q [N, D] for one page (lo, hi [D], D a multiple of 8): N independent sums of
// 8 lanes each, so the additions do not wait on one another.
template <int N>
static inline float key_bound_best(const float* __restrict q, const float* __restrict lo, const float* __restrict hi,
                                   int64_t D, float best) {
  __m256 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 l = _mm256_loadu_ps(lo + d), h = _mm256_loadu_ps(hi + d);
    for (int j = 0; j < N; ++j) {
      const __m256 qj = _mm256_loadu_ps(q + j * D + d);
      acc[j] = _mm256_add_ps(acc[j], _mm256_max_ps(_mm256_mul_ps(qj, l), _mm256_mul_ps(qj, h)));
    }
  }
  for (int j = 0; j < N; ++j) best = std::max(best, horizontal_sum(acc[j]));
  return best;
}

static void key_bound_page_scores_avx(const float* __restrict q, const float* __restrict lo,
                                      const float* __restrict hi, int64_t G, int64_t D, int64_t first, int64_t stop,
                                      float* __restrict score) {
  for (int64_t p = first; p < stop; ++p) {
    float best = -std::numeric_limits<float>::infinity();
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) best = key_bound_best<4>(q + g * D, lo + p * D, hi + p * D, D, best);
    switch (G - g) {
      case 3: best = key_bound_best<3>(q + g * D, lo + p * D, hi + p * D, D, best); break;
      case 2: best = key_bound_best<2>(q + g * D, lo + p * D, hi + p * D, D, best); break;
      case 1: best = key_bound_best<1>(q + g * D, lo + p * D, hi + p * D, D, best); break;
      default: break;
    }
    score[p] = best;
  }
}
#endif

// Page selection of one decoding step, the key-bound form: the score of page p for (sequence b, KV head h) is
// the largest over its G query heads of sum_d max(q_d low_pd, q_d high_pd) (never below any of its keys' q . k).
// query [B, H, G, D], low, high [B, H, P, D] float32 contiguous. Returns [B, H, k] int64: the k best pages.
torch::Tensor key_bound_top_pages(torch::Tensor query, torch::Tensor low, torch::Tensor high, int64_t k) {
  const int64_t B = query.size(0), H = query.size(1), G = query.size(2), D = query.size(3), P = low.size(2);
  TORCH_CHECK(k >= 1 && k <= P, "key_bound_top_pages: choose 1 to ", P, " pages, not ", k);
  auto out = torch::empty({B, H, k}, torch::kLong);
  const float* qp = query.data_ptr<float>();
  const float* lp = low.data_ptr<float>();
  const float* hp = high.data_ptr<float>();
  top_pages_in_parallel(B * H, P, k, out.data_ptr<int64_t>(), [&](int64_t task, int64_t first, int64_t stop,
                                                                   float* score) {
    const float *q = qp + task * G * D, *lo = lp + task * P * D, *hi = hp + task * P * D;
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) return key_bound_page_scores_avx(q, lo, hi, G, D, first, stop, score);
#endif
    key_bound_page_scores(q, lo, hi, G, D, first, stop, score);
  });
  return out;
}

// The low-rank score of pages [first, stop) (S keys each; see lowrank_top_pages) for one (sequence, KV head):
// q [G, r] float32, c [P, r, S] float16 or int8, each key's dot product times its scale ks [P, S] when given
// (nullptr: none), into score [P]; page [r * S] is scratch.
template <typename T>
static void lowrank_page_scores(const float* __restrict q, const T* __restrict c, const float* __restrict ks,
                                int64_t G, int64_t r, int64_t S, int64_t first, int64_t stop,
                                float* __restrict score, float* __restrict page) {
  for (int64_t p = first; p < stop; ++p) {
    for (int64_t i = 0; i < r * S; ++i) page[i] = static_cast<float>(c[p * r * S + i]);
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t s = 0; s < S; ++s) {
        float dot = 0.f;
        for (int64_t i = 0; i < r; ++i) dot += q[g * r + i] * page[i * S + s];
        best = std::max(best, ks ? dot * ks[p * S + s] : dot);
      }
    }
    score[p] = best;
  }
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// N query heads' (q [N, r]) dot products with a page's keys held widened in rows [r * W] (8 W keys, W registers per
// coordinate): two sums per head and register, over the even and the odd coordinates, so that 2 N W chains of
// fused multiply-adds run side by side instead of one waiting on the last.
template <int W, int N, bool KEY_SCALE>
static inline __m256 lowrank_best(const float* __restrict q, const __m256* __restrict rows, int64_t r,
                                  const __m256* __restrict key_scale, __m256 best) {
  __m256 even[N][W], odd[N][W];
  for (int j = 0; j < N; ++j)
    for (int w = 0; w < W; ++w) even[j][w] = odd[j][w] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 2 <= r; i += 2) {
    for (int j = 0; j < N; ++j) {
      const __m256 a = _mm256_broadcast_ss(q + j * r + i), b = _mm256_broadcast_ss(q + j * r + i + 1);
      for (int w = 0; w < W; ++w) {
        even[j][w] = _mm256_fmadd_ps(a, rows[i * W + w], even[j][w]);
        odd[j][w] = _mm256_fmadd_ps(b, rows[(i + 1) * W + w], odd[j][w]);
      }
    }
  }
  if (i < r) {
    for (int j = 0; j < N; ++j) {
      const __m256 a = _mm256_broadcast_ss(q + j * r + i);
      for (int w = 0; w < W; ++w) even[j][w] = _mm256_fmadd_ps(a, rows[i * W + w], even[j][w]);
    }
  }
  for (int j = 0; j < N; ++j) {
    for (int w = 0; w < W; ++w) {
      const __m256 dot = _mm256_add_ps(even[j][w], odd[j][w]);
      best = _mm256_max_ps(best, KEY_SCALE ? _mm256_mul_ps(dot, key_scale[w]) : dot);
    }
  }
  return best;
}

// Eight coordinates widened to float32: float16 ones, or int8 ones.
static inline __m256 widen8(const at::Half* c) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)));
}
static inline __m256 widen8(const int8_t* c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}

// lowrank_page_scores for pages of S = 8 W keys and r <= 64: a page's coordinates (and its keys' scales, with
// KEY_SCALE) widened once, then the query heads four at a time.
template <int W, bool KEY_SCALE, typename T>
static void lowrank_page_scores_avx(const float* __restrict q, const T* __restrict c, const float* __restrict ks,
                                    int64_t G, int64_t r, int64_t first, int64_t stop, float* __restrict score) {
  __m256 rows[64 * W];
  __m256 key_scale[W];
  for (int64_t p = first; p < stop; ++p) {
    const T* page = c + p * r * 8 * W;
    for (int64_t i = 0; i < r * W; ++i) rows[i] = widen8(page + 8 * i);
    if (KEY_SCALE)
      for (int w = 0; w < W; ++w) key_scale[w] = _mm256_loadu_ps(ks + p * 8 * W + 8 * w);
    __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) best = lowrank_best<W, 4, KEY_SCALE>(q + g * r, rows, r, key_scale, best);
    switch (G - g) {
      case 3: best = lowrank_best<W, 3, KEY_SCALE>(q + g * r, rows, r, key_scale, best); break;
      case 2: best = lowrank_best<W, 2, KEY_SCALE>(q + g * r, rows, r, key_scale, best); break;
      case 1: best = lowrank_best<W, 1, KEY_SCALE>(q + g * r, rows, r, key_scale, best); break;
      default: break;
    }
    score[p] = horizontal_max(best);
  }
}

template <int W, typename T>
static void lowrank_page_scores_avx(const float* q, const T* c, const float* ks, int64_t G, int64_t r,
                                    int64_t first, int64_t stop, float* score) {
  if (ks) return lowrank_page_scores_avx<W, true>(q, c, ks, G, r, first, stop, score);
  lowrank_page_scores_avx<W, false>(q, c, ks, G, r, first, stop, score);
}
#endif

// The low-rank scores of pages [first, stop) of one (sequence, KV head), coordinates of element type T, each
// key's dot products times its scale ks [P, S] when given (nullptr: none).
template <typename T>
static void lowrank_scores_of(const float* q, const T* c, const float* ks, int64_t G, int64_t r, int64_t S,
                              int64_t first, int64_t stop, float* score) {
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  if (r <= 64 && S == 8) return lowrank_page_scores_avx<1>(q, c, ks, G, r, first, stop, score);
  if (r <= 64 && S == 16) return lowrank_page_scores_avx<2>(q, c, ks, G, r, first, stop, score);
  if (r <= 64 && S == 32) return lowrank_page_scores_avx<4>(q, c, ks, G, r, first, stop, score);
#endif
  std::vector<float> page(S * r);
  lowrank_page_scores(q, c, ks, G, r, S, first, stop, score, page.data());
}

// Page selection of one decoding step, the low-rank form: the score of page p for (sequence b, KV head h) is the
// largest over its G query heads and its S keys of the query's and the key's coordinates' dot product; int8
// coordinates carry a scale per page (it multiplies the largest: a scale >= 0 commutes with it) or per key (it
// multiplies each key's dot products before the largest).
// query_coordinates [B, H, G, r] float32, coordinates [B, H, P, r, S] float16 or int8 (coordinate-major within a
// page, so each query head's S dot products run along the keys), scale float32 [B, H, P] or [B, H, P, S] for int8
// coordinates (empty for float16), contiguous. Returns [B, H, k].
torch::Tensor lowrank_top_pages(torch::Tensor query_coordinates, torch::Tensor coordinates, torch::Tensor scale,
                                int64_t k) {
  const int64_t B = query_coordinates.size(0), H = query_coordinates.size(1), G = query_coordinates.size(2);
  const int64_t r = query_coordinates.size(3), P = coordinates.size(2), S = coordinates.size(4);
  TORCH_CHECK(k >= 1 && k <= P, "lowrank_top_pages: choose 1 to ", P, " pages, not ", k);
  const bool quantized = coordinates.scalar_type() == torch::kChar;
  const bool per_key = quantized && scale.numel() == B * H * P * S && S > 1;
  TORCH_CHECK(!quantized || per_key || scale.numel() == B * H * P,
              "lowrank_top_pages: int8 coordinates need a scale per page or per key");
  auto out = torch::empty({B, H, k}, torch::kLong);
  const float* qp = query_coordinates.data_ptr<float>();
  top_pages_in_parallel(B * H, P, k, out.data_ptr<int64_t>(), [&](int64_t task, int64_t first, int64_t stop,
                                                                   float* score) {
    const float* q = qp + task * G * r;
    if (!quantized) return lowrank_scores_of(q, coordinates.data_ptr<at::Half>() + task * P * r * S, nullptr, G, r,
                                             S, first, stop, score);
    const float* key_scale = per_key ? scale.data_ptr<float>() + task * P * S : nullptr;
    lowrank_scores_of(q, coordinates.data_ptr<int8_t>() + task * P * r * S, key_scale, G, r, S, first, stop, score);
    if (per_key) return;
    const float* page_scale = scale.data_ptr<float>() + task * P;
    for (int64_t p = first; p < stop; ++p) score[p] *= page_scale[p];
  });
  return out;
}

// Read blocks `records` [n] (ascending) of `block_bytes` bytes each from the file `fd` into rows `rows` [n] of
// `dest` (rows at least block_bytes long), one preadv per run of consecutive records, then check each block's
// checksum (low half: the sum of its 32-bit words mod 2^32; high half: their xor) against `expected` [n].
// Returns -1 when every block is whole and matches, i >= 0 for the first block that does not match, or
// -2 - i when the file ends before block i.
// Read records rec[0 .. n) (ascending) of the tier file fd, where record r is its keys' block then its values'
// block, block_bytes each, at offset 2 r block_bytes, into row row[i] of key_base and of value_base (rows `stride`
// bytes apart): one preadv per run of consecutive records. Then check each block against its expected checksum
// (low half: the sum of its 32-bit words mod 2^32; high half: their xor), key_want[i] and value_want[i].
// Returns -1 when all is well, 2 i + half for the first block that does not match (half 0 keys, 1 values), or
// -2 - i when the file ends before record i.
static int64_t read_blocks(int fd, const int64_t* rec, const int64_t* row, int64_t n, int64_t block_bytes,
                           char* key_base, char* value_base, int64_t stride, const int64_t* key_want,
                           const int64_t* value_want) {
  std::vector<struct iovec> iov;
  for (int64_t first = 0; first < n;) {
    int64_t stop = first + 1;
    while (stop < n && rec[stop] == rec[stop - 1] + 1 && stop - first < 512) ++stop;
    iov.clear();
    for (int64_t i = first; i < stop; ++i) {
      iov.push_back({key_base + row[i] * stride, (size_t)block_bytes});
      iov.push_back({value_base + row[i] * stride, (size_t)block_bytes});
    }
    const ssize_t got = preadv(fd, iov.data(), (int)iov.size(), (off_t)(rec[first] * 2 * block_bytes));
    if (got != (ssize_t)((stop - first) * 2 * block_bytes)) return -2 - first;
    first = stop;
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t half = 0; half < 2; ++half) {
      const uint32_t* words = reinterpret_cast<const uint32_t*>((half ? value_base : key_base) + row[i] * stride);
      uint32_t sum = 0, mix = 0;
      for (int64_t w = 0; w < block_bytes / 4; ++w) { sum += words[w]; mix ^= words[w]; }
      if ((int64_t)((uint64_t)sum | ((uint64_t)mix << 32)) != (half ? value_want[i] : key_want[i])) return 2 * i + half;
    }
  }
  return -1;
}

// read_blocks into rows `rows` of dest [2, C, ...] (keys, values), against expected [2, n] int64.
int64_t read_file_blocks(int64_t fd, torch::Tensor records, int64_t block_bytes, torch::Tensor dest,
                         torch::Tensor rows, torch::Tensor expected) {
  const int64_t n = records.size(0);
  return read_blocks((int)fd, records.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), n, block_bytes,
                     static_cast<char*>(dest[0].data_ptr()), static_cast<char*>(dest[1].data_ptr()),
                     dest.stride(1) * dest.element_size(), expected.data_ptr<int64_t>(),
                     expected.data_ptr<int64_t>() + n);
}

// One decoding step's reads through a page-reading layer's LRU of tier blocks (PageCache.locate, fused): the slots
// [B, H, k] int64 that hold pages [B, H, k] (distinct per (sequence, head); block (page, b, h) is record
// (page * B + b) * H + h), the records not cached read from the tier file fd (see read_blocks) into the least
// recently used slots of slots [2, C, ...] (rows of block_bytes), each half checked against checksums [2, R].
// slot_of [> every record], record_of [C] and stamp [C] (int64, -1: never used) are updated in place; `reads`
// is this read's stamp. Returns {slots, status [4] int64}: status[0] is -1 when all is well, else the half
// (0 keys, 1 values) whose block failed, status[1] >= 0 for a checksum mismatch (-1: the file was short),
// status[2] the record; status[3] the records read. A failed read leaves its slots empty and first to go.
std::vector<torch::Tensor> page_cache_read(torch::Tensor pages, torch::Tensor slot_of, torch::Tensor record_of,
                                           torch::Tensor stamp, int64_t reads, int64_t fd,
                                           int64_t block_bytes, torch::Tensor slots, torch::Tensor checksums) {
  const int64_t B = pages.size(0), H = pages.size(1), k = pages.size(2), C = record_of.size(0);
  TORCH_CHECK(B * H * k <= C, "page_cache_read: ", B * H * k, " pages do not fit ", C, " slots");
  auto out = torch::empty({B, H, k}, torch::kLong);
  auto status = torch::full({4}, -1, torch::kLong);
  const int64_t* pg = pages.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  int64_t* so = slot_of.data_ptr<int64_t>();
  int64_t* ro = record_of.data_ptr<int64_t>();
  int64_t* st = stamp.data_ptr<int64_t>();
  int64_t* stat = status.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> missing;  // (record, position in out)
  for (int64_t i = 0; i < B * H * k; ++i) {
    const int64_t b = i / (H * k), h = (i / k) % H, record = (pg[i] * B + b) * H + h, slot = so[record];
    if (slot >= 0) {
      st[slot] = reads;
      o[i] = slot;
    } else {
      missing.emplace_back(record, i);
    }
  }
  const int64_t m = (int64_t)missing.size();
  stat[3] = m;
  if (m == 0) return {out, status};
  std::sort(missing.begin(), missing.end());  // runs of consecutive records are read with one preadv
  std::vector<int64_t> victims(C);
  std::iota(victims.begin(), victims.end(), 0);
  if (m < C)
    std::nth_element(victims.begin(), victims.begin() + (m - 1), victims.end(), [&](int64_t a, int64_t b) {
      return st[a] < st[b] || (st[a] == st[b] && a < b);
    });
  victims.resize(m);
  std::vector<int64_t> records(m);
  for (int64_t j = 0; j < m; ++j) {
    const int64_t v = victims[j];
    if (ro[v] >= 0) so[ro[v]] = -1;
    ro[v] = -1;
    records[j] = missing[j].first;
  }
  const int64_t R = checksums.size(1);
  const int64_t* sums = checksums.data_ptr<int64_t>();
  std::vector<int64_t> key_want(m), value_want(m);
  for (int64_t j = 0; j < m; ++j) {
    key_want[j] = sums[records[j]];
    value_want[j] = sums[R + records[j]];
  }
  const int64_t failed = read_blocks((int)fd, records.data(), victims.data(), m, block_bytes,
                                     static_cast<char*>(slots[0].data_ptr()), static_cast<char*>(slots[1].data_ptr()),
                                     slots.stride(1) * slots.element_size(), key_want.data(), value_want.data());
  if (failed != -1) {
    for (int64_t v : victims) st[v] = -1;
    stat[0] = failed >= 0 ? failed % 2 : 0;
    stat[1] = failed >= 0 ? failed / 2 : -1;
    stat[2] = failed >= 0 ? records[failed / 2] : -1;
    return {out, status};
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t v = victims[j];
    ro[v] = records[j];
    so[records[j]] = v;
    st[v] = reads;
    o[missing[j].second] = v;
  }
  return {out, status};
}
"""


_MODULE_NAME = "kvstack_kernels_v9"  # the C++ is compiled as this module: its PyInit_ symbol carries the name
_FUNCTIONS = ("packed_scores", "packed_weighted_values", "paged_attention_forward", "attention_with_column_sums",
              "selected_page_attention", "read_file_blocks", "key_bound_top_pages", "lowrank_top_pages",
              "page_cache_read")
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_LIBRARY = _MODULE_NAME + (".pyd" if sys.platform == "win32" else ".so")  # what load_inline writes
_BUILD_LOCK = "kvstack-build.lock"
_SCRATCH = ".build-"  # a build's private directory: <shared directory name>.build-<pid>-<random>


def _cpu_fingerprint() -> str:
    """Short hash of this CPU's model and instruction-set flags (the build uses ``-march=native``)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _build_fingerprint() -> str:
    """Short hash of what the library is compiled from: the C++, the flags and torch's build (ABI, commit).

    No path is part of it, so every virtual environment with the same python, torch and CPU finds one build.
    """
    parts = [_MODULE_NAME, _SOURCE, *_FUNCTIONS, *_CFLAGS, *_LDFLAGS, str(torch.version.git_version),
             str(torch.compiled_with_cxx11_abi())]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]


def build_directory() -> pathlib.Path:
    """Where the compiled kernels are published for this machine:
    ``kvstack_kernels_v9-py3XX-torchX.Y.Z-<cpu hash>-<build hash>`` under ``$TORCH_EXTENSIONS_DIR`` when
    set, else under PyTorch's default extension root.

    The CPU hash keeps a ``-march=native`` build from being loaded on another CPU model that shares the
    directory (a home directory mounted on several machines); the build hash changes with the C++ source
    and flags. Nothing environment-specific is in the name, so virtual environments share the build.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    python = f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}"
    version = f"{python}-torch{torch.__version__}-{_cpu_fingerprint()}-{_build_fingerprint()}"
    return pathlib.Path(root) / f"{_MODULE_NAME}-{version}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _import_library(library: pathlib.Path) -> ModuleType:
    """Import a published library directly: no compiler, no ninja, no lock (``torch`` is already imported)."""
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _module() -> ModuleType:
    """The kernels: the library published for this machine, compiled first if there is none yet.

    When it exists this only imports it, without a lock, so environments never wait on each other again.
    """
    library = build_directory() / _LIBRARY
    return _published(library) or _build(library)


def _published(library: pathlib.Path) -> ModuleType | None:
    """The published library, imported; None when there is none yet or it is damaged (rebuilt, replaced)."""
    if not library.is_file():
        return None
    try:
        return _import_library(library)
    except (ImportError, OSError):
        return None


def _build(library: pathlib.Path) -> ModuleType:
    """Compile the kernels and publish ``library`` atomically, once per machine.

    Builds run under an OS file lock (released when its holder dies, unlike PyTorch's ``lock`` file): a
    process that arrives while another environment compiles waits for that build, then loads its result.
    Each build compiles in a private directory beside the shared one, since ``load_inline`` writes this
    environment's include paths into ``build.ninja`` (a shared one made every environment rebuild), and moves
    the library in with ``os.replace``, so readers see the whole file or none. A build killed mid-way leaves
    only its private directory, which the next build removes.
    """
    from filelock import FileLock, Timeout
    from torch.utils import cpp_extension

    directory = library.parent
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / _BUILD_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say("kvstack: waiting for another process compiling the fused C++ kernels (once per machine)...")
        lock.acquire()
    try:
        module = _published(library)  # published while we waited
        if module is not None:
            return module
        for stale in directory.parent.glob(glob.escape(directory.name + _SCRATCH) + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # only the lock holder builds: these are dead builds'
        started = time.perf_counter()
        _say(f"kvstack: compiling the fused C++ kernels for this CPU and torch {torch.__version__} "
             "(once per machine, about a minute)...")
        scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"{directory.name}{_SCRATCH}{os.getpid()}-",
                                                dir=directory.parent))
        try:
            # PyTorch renames a second build of one name in a process (name_v1), which would not match _LIBRARY.
            versioner = getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None)
            if versioner is not None:
                versioner.entries.pop(_MODULE_NAME, None)
            module = cpp_extension.load_inline(
                name=_MODULE_NAME, cpp_sources=_SOURCE, functions=list(_FUNCTIONS), extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS), build_directory=str(scratch), verbose=False,
            )
            os.replace(scratch / library.name, library)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        _say(f"kvstack: compiled the fused C++ kernels in {time.perf_counter() - started:.0f} s ({directory})")
        return module
    finally:
        lock.release()


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


# The kernels compute in float32 and call ATen inside; CPU autocast would turn those calls to bf16, so it is
# off around every kernel (inputs are float32, or widened to it, which is exact from bf16). A quantized
# region's decode methods, which compute what they pass in (a rotated query), are wrapped as well.
def without_cpu_autocast(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel`` run with CPU autocast off.

    The context is entered only while CPU autocast is on (the check costs a fraction of a microsecond,
    entering a context a few microseconds, on every decode step), and a fresh one each time: autocast
    keeps its saved state on itself.
    """
    @functools.wraps(kernel)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled("cpu"):
            return kernel(*args, **kwargs)
        with torch.autocast(device_type="cpu", enabled=False):
            return kernel(*args, **kwargs)
    return run


@without_cpu_autocast
def packed_scores(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, query: torch.Tensor, length: int, bits: int,
    group: int, along_tokens: bool,
) -> torch.Tensor:
    """``[B, H, G, N]`` float32 dot products of ``query`` ``[B, H, G, D]`` with the first ``N`` packed keys.

    ``codes`` ``[B, H, capacity, D * bits / 8]`` uint8 (row-contiguous); ``scale``/``zero`` rows (float16,
    widened to float32 here: they are 1/16 of the codes or less) per ``group`` tokens (``along_tokens``) or
    per token with one column per ``group`` channels.
    """
    return _module().packed_scores(codes, scale.float(), zero.float(), query.contiguous(), length, bits, group,
                                   along_tokens)


@without_cpu_autocast
def packed_weighted_values(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weights: torch.Tensor, length: int, bits: int,
    group: int, along_tokens: bool,
) -> torch.Tensor:
    """``[B, H, G, D]`` float32: ``weights`` ``[B, H, G, N]`` applied to the first ``N`` packed values."""
    return _module().packed_weighted_values(codes, scale.float(), zero.float(), weights, length, bits, group,
                                            along_tokens)


@without_cpu_autocast
def paged_attention_forward(
    query: torch.Tensor, kv: torch.Tensor, layer: int, tables: torch.Tensor, token_seq: torch.Tensor,
    token_pos: torch.Tensor, scaling: float,
) -> torch.Tensor:
    """``[T, Hq, D]`` float32 attention of packed query tokens over a paged KV pool, read in place.

    ``query`` ``[T, Hq, D]`` float32; ``kv`` the pool's ``[num_blocks, L, 2, H, block_size, D]`` float32
    storage; ``tables`` ``[S, max_blocks]`` int64 block tables; ``token_seq`` ``[T]`` int64, the row of
    ``tables`` of each token; ``token_pos`` ``[T]`` int64, its position (it attends to positions
    ``0 .. token_pos``, causal). Query head ``h * G + g`` reads KV head ``h``.
    """
    return _module().paged_attention_forward(query.contiguous(), kv, layer, tables, token_seq, token_pos, scaling)


@without_cpu_autocast
def selected_page_attention(
    query: torch.Tensor, key_pages: torch.Tensor, value_pages: torch.Tensor, page_index: torch.Tensor,
    resident_keys: torch.Tensor, resident_values: torch.Tensor, scaling: float,
    resident_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, Hq, D]`` float32: one decoding query per sequence over the pages a policy chose and its resident entries.

    ``query`` ``[B, Hq, D]`` float32. ``key_pages``, ``value_pages`` ``[N, Hp, P, D]`` float32 views (rows
    contiguous), read in place: page ``i`` of KV head ``h`` is ``[i, h]`` when ``Hp == H`` (a paged pool's
    blocks), ``[i, 0]`` when ``Hp == 1`` (the page LRU's slots, one head each). ``page_index`` ``[B, H, k]``
    int64 the pages each (sequence, KV head) reads; ``resident_keys``, ``resident_values`` ``[B, H, R, D]``
    float32 (rows contiguous) the entries it always reads, of which sequence ``b`` reads the first
    ``resident_counts[b]`` (``[B]`` int64; None: all ``R``). Query head ``h * G + g`` reads KV head ``h``.
    """
    if resident_counts is None:
        resident_counts = torch.full((query.shape[0],), resident_keys.shape[2], dtype=torch.long)
    if key_pages.stride(-1) != 1 or value_pages.stride(-1) != 1:
        raise ValueError("selected_page_attention reads page rows in place: their last dimension must be contiguous")
    # The kernel walks rows by their strides; it needs each row's D numbers adjacent.
    resident_keys = resident_keys if resident_keys.stride(-1) == 1 else resident_keys.contiguous()
    resident_values = resident_values if resident_values.stride(-1) == 1 else resident_values.contiguous()
    return _module().selected_page_attention(query.contiguous(), key_pages, value_pages, page_index.contiguous(),
                                             resident_keys, resident_values, resident_counts.contiguous(), scaling)


@without_cpu_autocast
def key_bound_top_pages(query: torch.Tensor, low: torch.Tensor, high: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, H, count]`` int64, in no particular order: the pages with the largest key-bound scores.

    ``query`` ``[B, H, G, D]``, ``low`` and ``high`` ``[B, H, P, D]`` float32 (each page's key minima and
    maxima); page ``p``'s score is the largest over the ``G`` query heads of ``sum_d max(q_d low_d, q_d high_d)``
    (:data:`kvstack.contract.PAGE_SCORE_KEY_BOUND`); equal scores go to the lower page. ``1 <= count <= P``.
    """
    return _module().key_bound_top_pages(query.float().contiguous(), low.float().contiguous(),
                                         high.float().contiguous(), count)


@without_cpu_autocast
def lowrank_top_pages(query_coordinates: torch.Tensor, coordinates: torch.Tensor, count: int,
                      scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, count]`` int64, in no particular order: the pages with the largest low-rank scores.

    ``query_coordinates`` ``[B, H, G, r]`` float32 (the query heads on the layer's basis), ``coordinates``
    ``[B, H, P, r, S]`` float16, or int8 with ``scale`` ``[B, H, P]`` (a page's) or ``[B, H, P, S]`` (a key's)
    (each page's ``S`` keys on it, coordinate by coordinate); page ``p``'s score is the largest over the query
    heads and its keys of their dot product, each key's times its scale or the largest times the page's for int8
    (:data:`kvstack.contract.PAGE_SCORE_LOWRANK`); equal scores go to the lower page. ``1 <= count <= P``.
    """
    if coordinates.dtype == torch.int8:
        if scale is None or scale.shape not in (coordinates.shape[:3], coordinates.shape[:3] + coordinates.shape[4:]):
            raise ValueError("lowrank_top_pages: int8 coordinates [B, H, P, r, S] need a scale [B, H, P] per page "
                             "or [B, H, P, S] per key")
        scale = scale.float().contiguous()
    else:
        coordinates, scale = coordinates.to(torch.float16), torch.empty(0)
    return _module().lowrank_top_pages(query_coordinates.float().contiguous(), coordinates.contiguous(), scale,
                                       count)


def read_file_blocks(fd: int, records: torch.Tensor, block_bytes: int, dest: torch.Tensor, rows: torch.Tensor,
                     expected: torch.Tensor) -> tuple[int, int | None] | None:
    """Read records ``records`` ``[n]`` int64 (ascending) of the tier file ``fd`` into rows ``rows`` ``[n]`` of
    ``dest`` ``[2, C, ...]`` (keys, values).

    Record ``r`` is its keys' block, then its values', ``block_bytes`` each, at byte ``2 r block_bytes``; one
    ``preadv`` per run of consecutive records. Each block's checksum (see
    :func:`kvstack.cache.page_tier.block_checksums`) is compared with ``expected`` ``[2, n]`` (int64 bit
    patterns). Returns None when all match, else ``(half, i)``: the half (0 keys, 1 values) and index of the
    first block that does not, ``i`` None when the file ends before the records do.
    """
    failed = int(_module().read_file_blocks(fd, records, block_bytes, dest, rows, expected))
    if failed == -1:
        return None
    return (failed % 2, failed // 2) if failed >= 0 else (0, None)


def page_cache_read(pages: torch.Tensor, slot_of: torch.Tensor, record_of: torch.Tensor, stamp: torch.Tensor,
                    reads: int, fd: int, block_bytes: int, slots: torch.Tensor,
                    checksums: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """One decoding step's page reads through an LRU of tier blocks, in one call (see ``PageCache.locate_pages``).

    ``pages`` ``[B, H, k]`` int64 (distinct per sequence and head); ``slot_of``, ``record_of``, ``stamp`` the
    cache's int64 maps, updated in place; ``fd`` the tier's file (record ``r``: its keys' block, then its
    values', ``block_bytes`` each); ``slots`` ``[2, C, page, D]``; ``checksums`` ``[2, records]`` int64.
    Returns the slots ``[B, H, k]`` and ``[half, mismatch, record, read]``: ``half`` is -1 when every block read
    is whole and matches, else the half (0 keys, 1 values) of the first that is not, ``mismatch`` >= 0 for a
    checksum mismatch (-1: the file ended), ``record`` its record; ``read`` is how many records came from the tier.
    """
    out, status = _module().page_cache_read(pages.contiguous(), slot_of, record_of, stamp, reads, fd, block_bytes,
                                            slots, checksums)
    return out, status.tolist()


COLUMN_SUM_TILE_ROWS = 64  # query rows per task: G * 64 rows of scores stay in cache while they are used
COLUMN_SUM_TILE_BYTES = 4 << 20  # fewer rows per task when rows are long, so a tile stays about this size


@without_cpu_autocast
def attention_with_column_sums(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, want_below: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Causal attention of a chunk with H2O's column sums (and Scissorhands' below-mean counts), in one pass.

    ``query`` ``[B, Hq, q, D]`` float32 are the queries of the last ``q`` of the ``L`` entries in ``keys`` and
    ``values`` ``[B, H, L, D]`` float32; query row ``i`` sees entries ``0 .. L - q + i`` (no padding). Returns
    the output ``[B, Hq, q, D]``, the column sums ``[B, H, L]`` (the attention each entry receives, summed over
    the chunk's queries and the query heads of its group) and, with ``want_below``, ``[B, H, L]`` counts of the
    (query, head) rows that gave the entry less than the mean weight ``1 / n`` of a row seeing ``n`` entries.
    """
    group, length = query.shape[1] // keys.shape[1], keys.shape[2]
    rows = max(8, min(COLUMN_SUM_TILE_ROWS, COLUMN_SUM_TILE_BYTES // (4 * group * length)))
    # Under CPU autocast the values arrive in bf16 beside float32 queries and keys (RoPE promotes those).
    keys, values = keys.to(query.dtype), values.to(query.dtype)
    result = _module().attention_with_column_sums(query.contiguous(), keys, values, scaling, want_below, rows)
    return result[0], result[1], result[2] if want_below else None
