// Varlen attention forward on tensor cores: out [total_q, H, D] and lse [H, total_q] (fp32).
//
// Grid: (segment, head, query tile). Two instantiations of one kernel:
//   small path (WARPS = 1, 16 queries, 32-key tiles): ELIT's Read/Write segments (a few latents or a
//     16-token window) get one warp per (segment, head), with the segment's keys in shared memory;
//   tiled path (WARPS = 4, 64 queries, 64-key tiles): core / image segments, online softmax.
// A row that sees no key (empty key segment, or causal with Lq > Lk) gets zeros and lse = -inf.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "attention_common.cuh"

namespace elit {
namespace attn {
namespace {

static KernelRegistrar reg_fwd("varlen_attn_fwd_cuda");

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
                           float* __restrict__ lse, int H, int64_t total_q, float scale_log2, bool causal) {
  using Cfg = FwdCfg<T, D, WARPS, BN>;
  constexpr int DP = Cfg::DP, LDT = Cfg::LDT, LDO = Cfg::LDO, BM = Cfg::BM, LDS = Cfg::LDS, LDP = Cfg::LDP;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + Cfg::q_off);
  T* Ks = reinterpret_cast<T*>(smem + Cfg::k_off);
  T* Vs = reinterpret_cast<T*>(smem + Cfg::v_off);

  const int seg = blockIdx.x, h = blockIdx.y, m0 = blockIdx.z * BM;
  const int64_t qs = cu_q[seg], ks = cu_k[seg];
  const int lq = cu_q[seg + 1] - static_cast<int>(qs), lk = cu_k[seg + 1] - static_cast<int>(ks);
  if (m0 >= lq) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* Sw = reinterpret_cast<float*>(smem + Cfg::s_off) + warp * 16 * LDS;
  T* Pw = reinterpret_cast<T*>(smem + Cfg::p_off) + warp * 16 * LDP;
  float* Ow = reinterpret_cast<float*>(smem + Cfg::o_off) + warp * 16 * LDO;
  float* row_m = reinterpret_cast<float*>(smem + Cfg::m_off) + warp * 16;
  float* row_l = row_m + BM;

  // Keys past the last one any row of this tile may see are never loaded.
  const int last_row = min(m0 + BM, lq) - 1;
  const int kmax = causal ? max(0, min(lk, last_row + lk - lq + 1)) : lk;

  load_tile<T, D, BM>(Qs, q, qs, m0, lq, H, h);
  for (int idx = lane; idx < 16 * LDO; idx += 32) Ow[idx] = 0.f;
  if (lane < 16) {
    row_m[lane] = -INFINITY;
    row_l[lane] = 0.f;
  }
  const int r = lane / 2, half = lane % 2;  // two lanes per row of the warp's 16
  const int i = m0 + warp * 16 + r;         // query row inside the segment

  for (int n0 = 0; n0 < kmax; n0 += BN) {
    __syncthreads();  // previous K/V tile fully consumed
    load_tile<T, D, BN>(Ks, k, ks, n0, lk, H, h);
    load_tile<T, D, BN>(Vs, v, ks, n0, lk, H, h);
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
  // Row by row so the warp writes each output row with consecutive lanes.
  for (int rr = 0; rr < 16; ++rr) {
    const int ii = m0 + warp * 16 + rr;
    if (ii >= lq) break;
    const float l = row_l[rr];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* orow = out + ((qs + ii) * H + h) * static_cast<int64_t>(D);
    for (int d = lane; d < D; d += 32) orow[d] = from_float<T>(Ow[rr * LDO + d] * inv);
    if (lane == 0) lse[h * total_q + qs + ii] = l > 0.f ? row_m[rr] * kLn2 + logf(l) : -INFINITY;
  }
}

template <typename T, int D, int WARPS, int BN>
void launch_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                const at::Tensor& cu_k, int64_t max_q, double scale, bool causal, at::Tensor& out, at::Tensor& lse) {
  using Cfg = FwdCfg<T, D, WARPS, BN>;
  const int64_t segs = cu_q.size(0) - 1, H = q.size(1);
  const int64_t tiles = ceil_div(max_q, Cfg::BM);
  TORCH_CHECK(H <= 65535, "q: at most 65535 heads, got ", H);
  TORCH_CHECK(tiles <= 65535, "max_seqlen_q: too long for the CUDA kernel (", max_q, ")");
  if (segs == 0 || tiles == 0 || H == 0) return;
  auto kernel = varlen_attn_fwd_kernel<T, D, WARPS, BN>;
  set_smem(kernel, Cfg::bytes);
  dim3 grid(segs, H, tiles);
  kernel<<<grid, WARPS * 32, Cfg::bytes, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(q.const_data_ptr()), static_cast<const T*>(k.const_data_ptr()),
      static_cast<const T*>(v.const_data_ptr()), cu_q.const_data_ptr<int32_t>(), cu_k.const_data_ptr<int32_t>(),
      static_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<float>(), static_cast<int>(H), q.size(0),
      static_cast<float>(scale) * kLog2e, causal);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, const at::Tensor& cu_q_,
                                                        const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
                                                        double scale, bool causal) {
  check_attention_args(q_, k_, v_, cu_q_, cu_k_, max_q, max_k);
  check_cuda_attention_inputs(q_);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = aligned(q_), k = aligned(k_), v = aligned(v_);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  dispatch_half_types(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(q.size(2), [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (max_q <= 32)
        launch_fwd<T, D, 1, 32>(q, k, v, cu_q, cu_k, max_q, scale, causal, out, lse);
      else
        launch_fwd<T, D, 4, 64>(q, k, v, cu_q, cu_k, max_q, scale, causal, out, lse);
    });
  });
  return {out, lse};
}

}  // namespace
}  // namespace attn

TORCH_LIBRARY_IMPL(elit, CUDA, m) { m.impl("varlen_attn_fwd", &attn::varlen_attn_fwd_cuda); }

}  // namespace elit
