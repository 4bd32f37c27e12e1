// Varlen attention backward on tensor cores: (dq, dk, dv), deterministic (no atomics).
//
// Three kernels, each recomputing P = exp(S * scale - lse) from the forward's lse:
//   delta:  Di = rowsum(dout * out)                                  [H, total_q] fp32
//   dq:     grid (segment query tiles, query head), loops over key tiles:  dq = scale * dS K
//   dk/dv:  grid (segment key tiles, kv head), loops over the query heads sharing the kv head (GQA) and
//           their query tiles:                                         dv = P^T dO, dk = scale * dS^T Q
// with dS = P * (dO V^T - Di); a query row with a single visible key uses P = 1 and dS = 0 exactly (the
// softmax's own backward) rather than their rounded values. Tiles map to segments as in the forward
// (attn::segment_tiles), rows past cu_seqlens[-1] included: they get zero gradients. Tile shapes follow the forward: a one-warp small path for the tiny
// Read/Write segments and a 4-warp (dq) / 2-warp (dk/dv) tiled path, which keeps dk/dv under the
// 163 KB of shared memory of sm_80.
// ATen glue: attention_cuda.cpp.
#include "attention_common.cuh"

namespace elit {
namespace attn {
namespace {

template <typename T, int D>
__global__ void attn_bwd_delta_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                      float* __restrict__ delta, int64_t total_q, int H) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (w >= total_q * H) return;
  const int64_t tok = w / H;
  const int h = static_cast<int>(w % H);
  const T* a = dout + w * D;
  const T* b = out + w * D;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s += to_float(a[d]) * to_float(b[d]);
  s = warp_sum(s);
  if (lane == 0) delta[h * total_q + tok] = s;
}

// ---- dq ------------------------------------------------------------------------------------
template <typename T, int D, int WARPS, int BN>
struct DqCfg {
  static constexpr int DP = Dims<D>::DP, LDT = Dims<D>::LDT, LDO = Dims<D>::LDO;
  static constexpr int BM = 16 * WARPS, LDS = BN + 4, LDP = BN + 8;
  static constexpr size_t q_off = 0;
  static constexpr size_t do_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t k_off = do_off + sizeof(T) * BM * LDT;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t s_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t dp_off = s_off + sizeof(float) * WARPS * 16 * LDS;
  static constexpr size_t ds_off = dp_off + sizeof(float) * WARPS * 16 * LDS;
  static constexpr size_t acc_off = ds_off + sizeof(T) * WARPS * 16 * LDP;
  static constexpr size_t bytes = acc_off + sizeof(float) * WARPS * 16 * LDO;
};

template <typename T, int D, int WARPS, int BN>
__global__ void __launch_bounds__(WARPS * 32)
    varlen_attn_bwd_dq_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const float* __restrict__ lse,
                              const float* __restrict__ delta, const int32_t* __restrict__ cu_q,
                              const int32_t* __restrict__ cu_k, T* __restrict__ dq, int H, int group, int64_t segs,
                              int64_t total_q, int64_t total_k, int64_t max_q, int64_t q_st, int64_t q_sh,
                              int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh, float scale, bool causal) {
  using Cfg = DqCfg<T, D, WARPS, BN>;
  constexpr int DP = Cfg::DP, LDT = Cfg::LDT, LDO = Cfg::LDO, BM = Cfg::BM, LDS = Cfg::LDS, LDP = Cfg::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + Cfg::q_off);
  T* dOs = reinterpret_cast<T*>(smem + Cfg::do_off);
  T* Ks = reinterpret_cast<T*>(smem + Cfg::k_off);
  T* Vs = reinterpret_cast<T*>(smem + Cfg::v_off);
  const int h = blockIdx.y, hk = h / group;
  const SegmentTiles t = segment_tiles(cu_q, segs, total_q, max_q, BM);
  const int64_t qs = t.start;
  const int lq = static_cast<int>(t.count);
  int64_t ks;
  int lk;
  partner_rows(cu_k, t.seg, segs, total_k, ks, lk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + Cfg::s_off) + warp * 16 * LDS;
  float* dPw = reinterpret_cast<float*>(smem + Cfg::dp_off) + warp * 16 * LDS;
  T* dSw = reinterpret_cast<T*>(smem + Cfg::ds_off) + warp * 16 * LDP;
  float* Aw = reinterpret_cast<float*>(smem + Cfg::acc_off) + warp * 16 * LDO;
  const float scale_log2 = scale * kLog2e;
  const int r = lane / 2, half = lane % 2;
  // dout is the contiguous [total_q, H, D] the glue passes.
  const int64_t do_st = static_cast<int64_t>(H) * D;

  for (int64_t tile = t.first; tile * BM < lq; tile += t.step) {
    const int m0 = static_cast<int>(tile * BM);
    __syncthreads();
    const int last_row = min(m0 + BM, lq) - 1;
    const int kmax = causal ? max(0, min(lk, last_row + lk - lq + 1)) : lk;
    load_tile<T, D, BM>(Qs, q, qs, m0, lq, q_st, h * q_sh);
    load_tile<T, D, BM>(dOs, dout, qs, m0, lq, do_st, static_cast<int64_t>(h) * D);
    for (int idx = lane; idx < 16 * LDO; idx += 32) Aw[idx] = 0.f;
    const int i = m0 + warp * 16 + r;
    const float lse2 = i < lq ? lse[h * total_q + qs + i] * kLog2e : 0.f;
    const float di = i < lq ? delta[h * total_q + qs + i] : 0.f;
    // A row with one visible key has p = 1 and ds = 0 exactly (none: nothing): no dq at all.
    const bool multi = visible_count(i, lq, lk, causal) > 1;

    for (int n0 = 0; n0 < kmax; n0 += BN) {
      __syncthreads();
      load_tile<T, D, BN>(Ks, k, ks, n0, lk, k_st, hk * k_sh);
      load_tile<T, D, BN>(Vs, v, ks, n0, lk, v_st, hk * v_sh);
      __syncthreads();
      warp_gemm<T, DP, BN, true, false>(Sw, LDS, Qs + warp * 16 * LDT, LDT, Ks, LDT);    // S = Q K^T
      warp_gemm<T, DP, BN, true, false>(dPw, LDS, dOs + warp * 16 * LDT, LDT, Vs, LDT);  // dP = dO V^T
      __syncwarp();
      for (int c = half * (BN / 2); c < (half + 1) * (BN / 2); ++c) {
        const float p =
            multi && visible(i, n0 + c, lq, lk, causal) ? exp2f(Sw[r * LDS + c] * scale_log2 - lse2) : 0.f;
        dSw[r * LDP + c] = from_float<T>(p * (dPw[r * LDS + c] - di));
      }
      __syncwarp();
      warp_gemm<T, BN, DP, false, true>(Aw, LDO, dSw, LDP, Ks, LDT);  // dq += dS K
      __syncwarp();
    }
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int ii = m0 + warp * 16 + rr;
      if (ii >= lq) break;
      T* row = dq + ((qs + ii) * H + h) * static_cast<int64_t>(D);
      for (int d = lane; d < D; d += 32) row[d] = from_float<T>(Aw[rr * LDO + d] * scale);
    }
  }
}

// ---- dk / dv ------------------------------------------------------------------------------
template <typename T, int D, int WARPS, int BM>
struct DkvCfg {
  static constexpr int DP = Dims<D>::DP, LDT = Dims<D>::LDT, LDO = Dims<D>::LDO;
  static constexpr int BN = 16 * WARPS, LDS = BM + 4, LDP = BM + 8;
  static constexpr size_t k_off = 0;
  static constexpr size_t v_off = k_off + sizeof(T) * BN * LDT;
  static constexpr size_t q_off = v_off + sizeof(T) * BN * LDT;
  static constexpr size_t do_off = q_off + sizeof(T) * BM * LDT;
  static constexpr size_t s_off = do_off + sizeof(T) * BM * LDT;
  static constexpr size_t dp_off = s_off + sizeof(float) * WARPS * 16 * LDS;
  static constexpr size_t p_off = dp_off + sizeof(float) * WARPS * 16 * LDS;
  static constexpr size_t ds_off = p_off + sizeof(T) * WARPS * 16 * LDP;
  static constexpr size_t dk_off = ds_off + sizeof(T) * WARPS * 16 * LDP;
  static constexpr size_t dv_off = dk_off + sizeof(float) * WARPS * 16 * LDO;
  static constexpr size_t l_off = dv_off + sizeof(float) * WARPS * 16 * LDO;
  static constexpr size_t bytes = l_off + sizeof(float) * 3 * BM;
};

template <typename T, int D, int WARPS, int BM>
__global__ void __launch_bounds__(WARPS * 32)
    varlen_attn_bwd_dkv_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                               const T* __restrict__ v, const float* __restrict__ lse,
                               const float* __restrict__ delta, const int32_t* __restrict__ cu_q,
                               const int32_t* __restrict__ cu_k, T* __restrict__ dk, T* __restrict__ dv, int H,
                               int group, int64_t segs, int64_t total_q, int64_t total_k, int64_t max_k, int64_t q_st,
                               int64_t q_sh, int64_t k_st, int64_t k_sh, int64_t v_st, int64_t v_sh, float scale,
                               bool causal) {
  using Cfg = DkvCfg<T, D, WARPS, BM>;
  constexpr int DP = Cfg::DP, LDT = Cfg::LDT, LDO = Cfg::LDO, BN = Cfg::BN, LDS = Cfg::LDS, LDP = Cfg::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + Cfg::k_off);
  T* Vs = reinterpret_cast<T*>(smem + Cfg::v_off);
  T* Qs = reinterpret_cast<T*>(smem + Cfg::q_off);
  T* dOs = reinterpret_cast<T*>(smem + Cfg::do_off);
  float* lse_s = reinterpret_cast<float*>(smem + Cfg::l_off);
  float* del_s = lse_s + BM;
  float* one_s = del_s + BM;  // 1 where the query row sees exactly one key
  const int hk = blockIdx.y, Hk = H / group;  // kv head; the query heads hk * group + g share it
  const SegmentTiles t = segment_tiles(cu_k, segs, total_k, max_k, BN);
  const int64_t ks = t.start;
  const int lk = static_cast<int>(t.count);
  int64_t qs;
  int lq;
  partner_rows(cu_q, t.seg, segs, total_q, qs, lq);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* St = reinterpret_cast<float*>(smem + Cfg::s_off) + warp * 16 * LDS;    // [16 keys, BM queries]
  float* dPt = reinterpret_cast<float*>(smem + Cfg::dp_off) + warp * 16 * LDS;
  T* Pt = reinterpret_cast<T*>(smem + Cfg::p_off) + warp * 16 * LDP;
  T* dSt = reinterpret_cast<T*>(smem + Cfg::ds_off) + warp * 16 * LDP;
  float* dKw = reinterpret_cast<float*>(smem + Cfg::dk_off) + warp * 16 * LDO;
  float* dVw = reinterpret_cast<float*>(smem + Cfg::dv_off) + warp * 16 * LDO;
  const float scale_log2 = scale * kLog2e;
  const int r = lane / 2, half = lane % 2;
  const int64_t do_st = static_cast<int64_t>(H) * D;

  for (int64_t tile = t.first; tile * BN < lk; tile += t.step) {
    const int n0 = static_cast<int>(tile * BN);
    __syncthreads();
    load_tile<T, D, BN>(Ks, k, ks, n0, lk, k_st, hk * k_sh);
    load_tile<T, D, BN>(Vs, v, ks, n0, lk, v_st, hk * v_sh);
    for (int idx = lane; idx < 16 * LDO; idx += 32) {
      dKw[idx] = 0.f;
      dVw[idx] = 0.f;
    }
    // Under causal, query i sees key j iff i >= j - (lk - lq): earlier query tiles are skipped.
    const int q_begin = causal ? max(0, n0 - (lk - lq)) / BM * BM : 0;
    const int j = n0 + warp * 16 + r;  // key row inside the segment

    for (int g = 0; g < group; ++g) {
      const int h = hk * group + g;
      for (int m0 = q_begin; m0 < lq; m0 += BM) {
        __syncthreads();
        load_tile<T, D, BM>(Qs, q, qs, m0, lq, q_st, h * q_sh);
        load_tile<T, D, BM>(dOs, dout, qs, m0, lq, do_st, static_cast<int64_t>(h) * D);
        for (int c = threadIdx.x; c < BM; c += blockDim.x) {
          const bool ok = m0 + c < lq;
          lse_s[c] = ok ? lse[h * total_q + qs + m0 + c] * kLog2e : 0.f;
          del_s[c] = ok ? delta[h * total_q + qs + m0 + c] : 0.f;
          one_s[c] = ok && visible_count(m0 + c, lq, lk, causal) == 1 ? 1.f : 0.f;
        }
        __syncthreads();
        warp_gemm<T, DP, BM, true, false>(St, LDS, Ks + warp * 16 * LDT, LDT, Qs, LDT);    // S^T = K Q^T
        warp_gemm<T, DP, BM, true, false>(dPt, LDS, Vs + warp * 16 * LDT, LDT, dOs, LDT);  // dP^T = V dO^T
        __syncwarp();
        for (int c = half * (BM / 2); c < (half + 1) * (BM / 2); ++c) {
          const bool vis = visible(m0 + c, j, lq, lk, causal), one = one_s[c] != 0.f;
          // A single visible key: p = 1 and ds = 0 exactly, as the softmax's own backward.
          const float p = !vis ? 0.f : (one ? 1.f : exp2f(St[r * LDS + c] * scale_log2 - lse_s[c]));
          Pt[r * LDP + c] = from_float<T>(p);
          dSt[r * LDP + c] = from_float<T>(one ? 0.f : p * (dPt[r * LDS + c] - del_s[c]));
        }
        __syncwarp();
        warp_gemm<T, BM, DP, false, true>(dVw, LDO, Pt, LDP, dOs, LDT);  // dv += P^T dO
        warp_gemm<T, BM, DP, false, true>(dKw, LDO, dSt, LDP, Qs, LDT);  // dk += dS^T Q
        __syncwarp();
      }
    }
    __syncwarp();
    for (int rr = 0; rr < 16; ++rr) {
      const int jj = n0 + warp * 16 + rr;
      if (jj >= lk) break;
      const int64_t off = ((ks + jj) * Hk + hk) * static_cast<int64_t>(D);
      for (int d = lane; d < D; d += 32) {
        dk[off + d] = from_float<T>(dKw[rr * LDO + d] * scale);
        dv[off + d] = from_float<T>(dVw[rr * LDO + d]);
      }
    }
  }
}

template <typename T, int D, int DQ_WARPS, int DQ_BN, int KV_WARPS, int KV_BM>
cudaError_t launch_bwd(const cuda::AttnParams& p, cudaStream_t stream) {
  using DqC = DqCfg<T, D, DQ_WARPS, DQ_BN>;
  using KvC = DkvCfg<T, D, KV_WARPS, KV_BM>;
  const int H = static_cast<int>(p.heads), Hk = static_cast<int>(p.kv_heads), group = H / Hk;
  if (H == 0) return cudaSuccess;
  const T* dout = static_cast<const T*>(p.dout);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  if (p.total_q > 0) {
    const int64_t warps = p.total_q * H;
    attn_bwd_delta_kernel<T, D><<<ceil_div(warps, 8), 256, 0, stream>>>(dout, static_cast<const T*>(p.out), p.delta,
                                                                        p.total_q, H);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    auto kernel = varlen_attn_bwd_dq_kernel<T, D, DQ_WARPS, DQ_BN>;
    e = set_smem(kernel, DqC::bytes);
    if (e != cudaSuccess) return e;
    dim3 grid(static_cast<unsigned>(num_blocks(p.segs, p.total_q, p.max_q, DqC::BM)), static_cast<unsigned>(H));
    kernel<<<grid, DQ_WARPS * 32, DqC::bytes, stream>>>(
        dout, q, k, v, p.lse_in, p.delta, p.cu_q, p.cu_k, static_cast<T*>(p.dq), H, group, p.segs, p.total_q, p.total_k,
        p.max_q,
        p.q_st, p.q_sh, p.k_st, p.k_sh, p.v_st, p.v_sh, p.scale, p.causal);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (p.total_k > 0) {
    auto kernel = varlen_attn_bwd_dkv_kernel<T, D, KV_WARPS, KV_BM>;
    cudaError_t e = set_smem(kernel, KvC::bytes);
    if (e != cudaSuccess) return e;
    dim3 grid(static_cast<unsigned>(num_blocks(p.segs, p.total_k, p.max_k, KvC::BN)), static_cast<unsigned>(Hk));
    kernel<<<grid, KV_WARPS * 32, KvC::bytes, stream>>>(
        dout, q, k, v, p.lse_in, p.delta, p.cu_q, p.cu_k, static_cast<T*>(p.dk), static_cast<T*>(p.dv), H, group,
        p.segs, p.total_q, p.total_k, p.max_k, p.q_st, p.q_sh, p.k_st, p.k_sh, p.v_st, p.v_sh, p.scale, p.causal);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

inline bool small_bwd(int64_t max_q, int64_t max_k) { return max_q <= 32 && max_k <= 32; }

}  // namespace
}  // namespace attn

namespace cuda {

cudaError_t varlen_attn_bwd(const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  attn::dispatch_half_types(p.bf16, [&](auto tag) {
    using T = decltype(tag);
    const bool dispatched = attn::dispatch_head_dim(p.head_dim, [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (attn::small_bwd(p.max_q, p.max_k))
        err = attn::launch_bwd<T, D, 1, 32, 1, 32>(p, stream);
      else
        err = attn::launch_bwd<T, D, 4, 64, 2, 64>(p, stream);
    });
    if (!dispatched) err = cudaErrorInvalidValue;  // no kernel for this head dim: launch nothing
  });
  return err;
}

}  // namespace cuda
}  // namespace elit
