// Shared pieces of the tensor-core varlen attention kernels (WMMA m16n16k16, fp32 accumulate).
//
// Shapes: q [total_q, H, D], k/v [total_k, H_kv, D] (query head h reads kv head h / (H / H_kv)), cu_seqlens
// int32 [S+1], lse [H, total_q] fp32.
// Every warp owns 16 rows (queries in forward/dQ, keys in dK/dV). Scores go through a per-warp
// fp32 shared tile because WMMA accumulator layouts are opaque; the online-softmax rescale of the
// output accumulator likewise happens in shared memory. Head dims that are not a multiple of 16
// (72) are zero-padded to DP in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace elit {
namespace attn {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <int D>
struct Dims {
  static constexpr int DP = (D + 15) / 16 * 16;  // padded head dim (K of the QK^T product)
  static constexpr int LDT = DP + 8;             // smem row stride of 16-bit tiles (elements)
  static constexpr int LDO = DP + 4;             // smem row stride of fp32 [16, DP] accumulators
};

// Copy rows [row0, row0 + rows) of one head of a [total, H, D] tensor (token stride `st`, the head's
// offset `hoff`, in elements) into a [rows, DP] smem tile (row stride LDT); rows at or past `valid` and
// columns past D are zero-filled. 16-byte vectors: D, st and hoff are multiples of 8 and the base is
// 16-byte aligned (the glue copies any view that is not).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t tok0, int row0,
                                          int valid, int64_t st, int64_t hoff) {
  constexpr int DP = Dims<D>::DP, LDT = Dims<D>::LDT, VPR = DP / 8;
  for (int idx = threadIdx.x; idx < ROWS * VPR; idx += blockDim.x) {
    const int r = idx / VPR, c = (idx % VPR) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < valid && c < D)
      val = *reinterpret_cast<const uint4*>(src + (tok0 + row0 + r) * st + hoff + c);
    *reinterpret_cast<uint4*>(dst + r * LDT + c) = val;
  }
}

// Which rows a block works on, along the axis `cu` (int32 [S+1]) cuts into segments; the block loops over
// tiles first, first + step, ... below ceil(count / ROWS). Segment S is the rows past cu[S] up to `total`
// (a buffer longer than the packed data), which the kernels fill with zeros. Two mappings, chosen from
// the launch shape alone exactly as num_blocks sizes grid.x (the Triton kernels use the same scheme):
//   dense:  ceil(max_len / ROWS) blocks per segment, stepping by that count, so a segment longer than
//           max_len is still covered in full;
//   search: when max_len is slack enough that dense would launch more blocks than
//           total / ROWS + S + 1, segment s owns blocks [cu[s] / ROWS + s, cu[s+1] / ROWS + s + 1), which
//           covers it at any length; a binary search over cu finds it.
struct SegmentTiles {
  int64_t seg, first, step, start, count;
};

// A cu_seqlens element as a row index in [0, total]: every element is read through it, so cu_seqlens that
// run past the rows (a compiled graph skips the host-side value checks) never address memory outside the
// tensors; a segment that ends before it starts is empty.
__device__ __forceinline__ int64_t clamp_row(int32_t c, int64_t total) {
  return min(max(static_cast<int64_t>(c), static_cast<int64_t>(0)), total);
}

inline int64_t num_blocks(int64_t segs, int64_t total, int64_t max_len, int64_t rows) {
  const int64_t dense = (segs + 1) * ((std::max<int64_t>(max_len, 1) + rows - 1) / rows);
  return std::min(dense, total / rows + segs + 1);
}

__device__ __forceinline__ SegmentTiles segment_tiles(const int32_t* __restrict__ cu, int64_t S, int64_t total,
                                                      int64_t max_len, int rows) {
  const int64_t pid = blockIdx.x;
  const int64_t nb = (max(max_len, static_cast<int64_t>(1)) + rows - 1) / rows;
  const bool search = (S + 1) * nb > total / rows + S + 1;
  SegmentTiles t;
  if (search) {
    int64_t lo = 0, hi = S + 1;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (clamp_row(cu[mid], total) / rows + mid <= pid) lo = mid; else hi = mid;
    }
    t.seg = lo;
    t.first = pid - (clamp_row(cu[lo], total) / rows + lo);
  } else {
    t.seg = pid / nb;
    t.first = pid % nb;
  }
  t.start = clamp_row(cu[t.seg], total);
  t.count = max((t.seg < S ? clamp_row(cu[t.seg + 1], total) : total) - t.start, static_cast<int64_t>(0));
  t.step = search ? max((t.count + rows - 1) / rows, static_cast<int64_t>(1)) : nb;
  return t;
}

// Rows of segment `seg` along the other axis, which has `total` rows (none for the tail segment S).
__device__ __forceinline__ void partner_rows(const int32_t* __restrict__ cu, int64_t seg, int64_t S, int64_t total,
                                             int64_t& start, int& count) {
  start = clamp_row(cu[seg], total);
  count = static_cast<int>(max(clamp_row(cu[min(seg + 1, S)], total) - start, static_cast<int64_t>(0)));
}

// Keys query row i (of lq, in a segment of lk keys) sees.
__device__ __forceinline__ int visible_count(int i, int lq, int lk, bool causal) {
  return causal ? min(max(i + lk - lq + 1, 0), lk) : lk;
}

// acc[16 x N] (fp32, smem, stride lda) = A[16 x K] (16-bit smem, row-major, stride lda_a) times
// B[K x N]; B is read row-major (B[k][n] at b[k * ldb + n]) or col-major (at b[n * ldb + k]).
template <typename T, int M_K, int N, bool kBColMajor, bool kAccumulate>
__device__ __forceinline__ void warp_gemm(float* acc, int ldacc, const T* a, int lda, const T* b, int ldb) {
  using BLayout = typename std::conditional<kBColMajor, wmma::col_major, wmma::row_major>::type;
#pragma unroll
  for (int n0 = 0; n0 < N; n0 += 16) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    if (kAccumulate)
      wmma::load_matrix_sync(c, acc + n0, ldacc, wmma::mem_row_major);
    else
      wmma::fill_fragment(c, 0.0f);
#pragma unroll
    for (int k0 = 0; k0 < M_K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
      wmma::load_matrix_sync(fa, a + k0, lda);
      wmma::load_matrix_sync(fb, kBColMajor ? b + n0 * ldb + k0 : b + k0 * ldb + n0, ldb);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(acc + n0, c, ldacc, wmma::mem_row_major);
  }
}

// Query row i (of lq) sees key j (of lk) iff j < lk and, when causal, j <= i + lk - lq.
__device__ __forceinline__ bool visible(int i, int j, int lq, int lk, bool causal) {
  return i < lq && j < lk && (!causal || j <= i + lk - lq);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The instantiated head dims: cuda::kHeadDims (kernel_limits.h) lists the same ones for the glue's check.
// Returns false, running nothing, for any other head dim (the glue refuses those before it gets here).
template <typename F>
inline bool dispatch_head_dim(int64_t d, F&& f) {
  if (d == 64)
    f(std::integral_constant<int, 64>{});
  else if (d == 72)
    f(std::integral_constant<int, 72>{});
  else if (d == 128)
    f(std::integral_constant<int, 128>{});
  else
    return false;
  return true;
}

template <typename F>
inline void dispatch_half_types(bool bf16, F&& f) {
  if (bf16)
    f(__nv_bfloat16{});
  else
    f(__half{});
}

template <typename K>
inline cudaError_t set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace attn
}  // namespace elit
