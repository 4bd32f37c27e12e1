// Varlen attention forward on tensor cores: out [total_q, H, D] and lse [H, total_q] (fp32).
//
// Grid: (segment tiles, query head); attn::segment_tiles maps blocks to (segment, query tile) from the
// packed sizes, so neither a slack max_seqlen_q nor a segment longer than it goes wrong. The rows past
// cu_seqlens_q[-1] form one more segment with no keys (zeros, lse = +inf). Two instantiations of one kernel:
//   small path (WARPS = 1, 16 queries, 32-key tiles; max_seqlen_q <= 32): ELIT's Read/Write segments (a
//     few latents, or a 16-token window) get one warp per (segment, head), and a window of up to 32
//     keys sits in shared memory whole;
//   tiled path (WARPS = 4, 64 queries, 64-key tiles): core / image segments, online softmax.
// A row that sees no key (empty key segment, or causal with Lq > Lk) gets zeros and lse = +inf.
// GQA by indexing: query head h reads kv head h / (H / H_kv).
// ATen glue: attention_cuda.cpp.

#include "attention_common.cuh"

namespace elit {
namespace attn {
namespace {

template <typename T, int D, int WARPS, int BN>
struct FwdCfg {
  static constexpr int DP = Dims<D>::DP, LDT = Dims<D>::LDT, LDO = Dims<D>::LDO;
  static constexpr int BM = 16 * WARPS, LDS = BN + 4, LDP = BN + 8;
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t s_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t p_off = s_off + sizeof(float) * WARPS * 16 * LDS;
  static constexpr size_t o_off = p_off + sizeof(T) * WARPS * 16 * LDP;
  static constexpr size_t m_off = o_off + sizeof(float) * WARPS * 16 * LDO;
  static constexpr size_t bytes = m_off + sizeof(float) * 2 * BM;
};

template <typename T, int D, int WARPS, int BN>
__global__ void __launch_bounds__(WARPS * 32)
    varlen_attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const int32_t* __restrict__ cu_q, const int32_t* __restrict__ cu_k, T* __restrict__ out,
                           float* __restrict__ lse, int H, int group, int64_t segs, int64_t total_q, int64_t total_k,
                           int64_t max_q,
                           int64_t q_st, int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh,
                           float scale_log2, bool causal) {
  using Cfg = FwdCfg<T, D, WARPS, BN>;
  constexpr int DP = Cfg::DP, LDT = Cfg::LDT, LDO = Cfg::LDO, BM = Cfg::BM, LDS = Cfg::LDS, LDP = Cfg::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + Cfg::q_off);
  T* Ks = reinterpret_cast<T*>(smem + Cfg::k_off);
  T* Vs = reinterpret_cast<T*>(smem + Cfg::v_off);

  const int h = blockIdx.y, hk = h / group;  // GQA: query head h reads kv head hk
  const SegmentTiles t = segment_tiles(cu_q, segs, total_q, max_q, BM);
  const int64_t qs = t.start;
  const int lq = static_cast<int>(t.count);
  int64_t ks;
  int lk;
  partner_rows(cu_k, t.seg, segs, total_k, ks, lk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + Cfg::s_off) + warp * 16 * LDS;
  T* Pw = reinterpret_cast<T*>(smem + Cfg::p_off) + warp * 16 * LDP;
  float* Ow = reinterpret_cast<float*>(smem + Cfg::o_off) + warp * 16 * LDO;
  float* row_m = reinterpret_cast<float*>(smem + Cfg::m_off) + warp * 16;
  float* row_l = row_m + BM;
  const int r = lane / 2, half = lane % 2;  // two lanes per row of the warp's 16

  // Every thread of the block runs the same tiles (t is uniform), so the barriers inside stay uniform.
  for (int64_t tile = t.first; tile * BM < lq; tile += t.step) {
    const int m0 = static_cast<int>(tile * BM);
    __syncthreads();  // the previous tile is done with Qs / Ks / Vs
    // Keys past the last one any row of this tile may see are never loaded.
    const int last_row = min(m0 + BM, lq) - 1;
    const int kmax = causal ? max(0, min(lk, last_row + lk - lq + 1)) : lk;

    load_tile<T, D, BM>(Qs, q, qs, m0, lq, q_st, h * q_sh);
    for (int idx = lane; idx < 16 * LDO; idx += 32) Ow[idx] = 0.f;
    if (lane < 16) {
      row_m[lane] = -INFINITY;
      row_l[lane] = 0.f;
    }
    const int i = m0 + warp * 16 + r;  // query row inside the segment

    for (int n0 = 0; n0 < kmax; n0 += BN) {
      __syncthreads();  // previous K/V tile fully consumed
      load_tile<T, D, BN>(Ks, k, ks, n0, lk, k_st, hk * k_sh);
      load_tile<T, D, BN>(Vs, v, ks, n0, lk, v_st, hk * v_sh);
      __syncthreads();
      warp_gemm<T, DP, BN, true, false>(Sw, LDS, Qs + warp * 16 * LDT, LDT, Ks, LDT);  // S = Q K^T
      __syncwarp();
      float mloc = -INFINITY;
      for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
        const float s = visible(i, n0 + c, lq, lk, causal) ? Sw[r * LDS + c] * scale_log2 : -INFINITY;
        Sw[r * LDS + c] = s;
        mloc = fmaxf(mloc, s);
      }
      mloc = fmaxf(mloc, __shfl_xor_sync(0xffffffffu, mloc, 1));
      const float m_old = row_m[r], m_new = fmaxf(m_old, mloc);
      float lsum = 0.f;
      for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
        const float s = Sw[r * LDS + c];
        const float p = s == -INFINITY ? 0.f : exp2f(s - m_new);
        Pw[r * LDP + c] = from_float<T>(p);
        lsum += p;
      }
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      const float alpha = m_old == -INFINITY ? 0.f : exp2f(m_old - m_new);
      for (int c = half * (DP / 2); c < (half + 1) * (DP / 2); ++c) Ow[r * LDO + c] *= alpha;
      __syncwarp();
      if (half == 0) {
        row_l[r] = row_l[r] * alpha + lsum;
        row_m[r] = m_new;
      }
      warp_gemm<T, BN, DP, false, true>(Ow, LDO, Pw, LDP, Vs, LDT);  // O += P V
      __syncwarp();
    }
    __syncwarp();
    // Row by row so the warp writes each output row with consecutive lanes. A row that sees no key (l = 0)
    // stores zeros and lse = +inf, as flash-attn.
    for (int rr = 0; rr < 16; ++rr) {
      const int ii = m0 + warp * 16 + rr;
      if (ii >= lq) break;
      const float l = row_l[rr];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* orow = out + ((qs + ii) * H + h) * static_cast<int64_t>(D);
      for (int d = lane; d < D; d += 32) orow[d] = from_float<T>(Ow[rr * LDO + d] * inv);
      if (lane == 0) lse[h * total_q + qs + ii] = l > 0.f ? row_m[rr] * kLn2 + logf(l) : INFINITY;
    }
  }
}

// Small path for short query segments (Read/Write): one warp, 16 queries, 32-key tiles.
constexpr int64_t kSmallMaxQ = 32;

template <typename T, int D, int WARPS, int BN>
cudaError_t launch_fwd(const cuda::AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, D, WARPS, BN>;
  if (p.total_q == 0 || p.heads == 0) return cudaSuccess;
  auto kernel = varlen_attn_fwd_kernel<T, D, WARPS, BN>;
  cudaError_t e = set_smem(kernel, Cfg::bytes);
  if (e != cudaSuccess) return e;
  dim3 grid(static_cast<unsigned>(num_blocks(p.segs, p.total_q, p.max_q, Cfg::BM)), static_cast<unsigned>(p.heads));
  kernel<<<grid, WARPS * 32, Cfg::bytes, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v), p.cu_q, p.cu_k,
      static_cast<T*>(p.o), p.lse, static_cast<int>(p.heads), static_cast<int>(p.heads / p.kv_heads), p.segs,
      p.total_q, p.total_k, p.max_q, p.q_st, p.q_sh, p.k_st, p.k_sh, p.v_st, p.v_sh, p.scale * kLog2e, p.causal);
  return cudaGetLastError();
}

}  // namespace
}  // namespace attn

namespace cuda {

cudaError_t varlen_attn_fwd(const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  attn::dispatch_half_types(p.bf16, [&](auto tag) {
    using T = decltype(tag);
    const bool dispatched = attn::dispatch_head_dim(p.head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (p.max_q <= attn::kSmallMaxQ)
        err = attn::launch_fwd<T, D, 1, 32>(p, stream);
      else
        err = attn::launch_fwd<T, D, 4, 64>(p, stream);
    });
    if (!dispatched) err = cudaErrorInvalidValue;  // no kernel for this head dim: launch nothing
  });
  return err;
}

}  // namespace cuda
}  // namespace elit
