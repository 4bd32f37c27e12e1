// CUDA kernels of the ragged elementwise ops: LayerNorm(no affine) + adaLN modulate and the gated
// residual, forward and backward (ATen glue: modulate_cuda.cpp). Semantics:
// elit_kernels/reference/modulate.py.
//
// Rows are handled one warp each (C is a model width: 384..1152, two passes over a row stay in L1).
// Per-sample parameter gradients [B, C] are reduced by a column-parallel kernel that walks a chunk of
// tokens and flushes one atomicAdd per (chunk, sample run), so a sample-sorted index costs ~T/64
// atomics per column. Atomics make those gradients run-to-run nondeterministic in the last bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace elit {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
static_assert(kWarpsPerBlock == kNormRowsPerBlock, "the glue's token limit for grid.x (kernel_limits.h) must match");
constexpr int kRowsPerChunk = 64;
constexpr int kChunksPerBlock = 8;  // blockDim.y of the parameter-gradient kernel
static_assert(kRowsPerChunk * kChunksPerBlock == kParamGradTokensPerBlock,
              "the glue's token limit for grid.y (kernel_limits.h) must match the launch");

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t, typename acc_t>
__global__ void lnm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ shift,
                               const scalar_t* __restrict__ scale, const int64_t* __restrict__ index,
                               scalar_t* __restrict__ out, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                               int64_t T, int64_t C, int64_t B, acc_t eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= T) return;
  const scalar_t* xr = x + row * C;
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += 32) s += static_cast<acc_t>(xr[c]);
  const acc_t mu = warp_sum(s) / C;
  acc_t v = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t d = static_cast<acc_t>(xr[c]) - mu;
    v += d * d;
  }
  const acc_t rs = acc_t(1) / sqrt(warp_sum(v) / C + eps);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  const int64_t b = index[row];
  CUDA_KERNEL_ASSERT(b >= 0 && b < B);
  const scalar_t* sh = shift + b * C;
  const scalar_t* sc = scale + b * C;
  scalar_t* o = out + row * C;
  for (int64_t c = lane; c < C; c += 32)
    o[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mu) * rs * (acc_t(1) + static_cast<acc_t>(sc[c])) +
                                 static_cast<acc_t>(sh[c]));
}

template <typename scalar_t, typename acc_t>
__global__ void lnm_bwd_dx_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ scale, const int64_t* __restrict__ index,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                  scalar_t* __restrict__ gx, int64_t T, int64_t C, int64_t B) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= T) return;
  const int64_t b = index[row];
  CUDA_KERNEL_ASSERT(b >= 0 && b < B);
  const scalar_t* gr = g + row * C;
  const scalar_t* xr = x + row * C;
  const scalar_t* sc = scale + b * C;
  const acc_t mu = mean[row], rs = rstd[row];
  acc_t a = 0, bs = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t gh = static_cast<acc_t>(gr[c]) * (acc_t(1) + static_cast<acc_t>(sc[c]));
    a += gh;
    bs += gh * (static_cast<acc_t>(xr[c]) - mu) * rs;
  }
  a = warp_sum(a) / C;
  bs = warp_sum(bs) / C;
  scalar_t* o = gx + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t gh = static_cast<acc_t>(gr[c]) * (acc_t(1) + static_cast<acc_t>(sc[c]));
    const acc_t xh = (static_cast<acc_t>(xr[c]) - mu) * rs;
    o[c] = static_cast<scalar_t>(rs * (gh - a - xh * bs));
  }
}

// kModulate: d1 += g * xhat (dscale), d2 += g (dshift). Otherwise d1 += g * other (dgate).
template <typename scalar_t, typename acc_t, bool kModulate>
__global__ void param_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ other,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                  const int64_t* __restrict__ index, acc_t* __restrict__ d1, acc_t* __restrict__ d2,
                                  int64_t T, int64_t C, int64_t B) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  if (c >= C) return;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y) * kRowsPerChunk;
  const int64_t t1 = min(T, t0 + kRowsPerChunk);
  acc_t a1 = 0, a2 = 0;
  int64_t cur = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = index[t];
    CUDA_KERNEL_ASSERT(b >= 0 && b < B);
    if (b != cur) {
      if (cur >= 0) {
        atomicAdd(d1 + cur * C + c, a1);
        if (kModulate) atomicAdd(d2 + cur * C + c, a2);
      }
      cur = b;
      a1 = a2 = 0;
    }
    const acc_t gv = static_cast<acc_t>(g[t * C + c]);
    if constexpr (kModulate) {
      a1 += gv * (static_cast<acc_t>(other[t * C + c]) - mean[t]) * rstd[t];
      a2 += gv;
    } else {
      a1 += gv * static_cast<acc_t>(other[t * C + c]);
    }
  }
  if (cur >= 0) {
    atomicAdd(d1 + cur * C + c, a1);
    if (kModulate) atomicAdd(d2 + cur * C + c, a2);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gated_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                 const scalar_t* __restrict__ gate, const int64_t* __restrict__ index,
                                 scalar_t* __restrict__ out, int64_t n, int64_t C, int64_t B) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / C, c = i - t * C, b = index[t];
    CUDA_KERNEL_ASSERT(b >= 0 && b < B);
    const acc_t gv = static_cast<acc_t>(gate[b * C + c]);
    out[i] = static_cast<scalar_t>((x ? static_cast<acc_t>(x[i]) : acc_t(0)) + gv * static_cast<acc_t>(y[i]));
  }
}


template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat: f(float{}, float{}); break;
    case DType::kDouble: f(double{}, double{}); break;
    case DType::kHalf: f(__half{}, float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}, float{}); break;
  }
}

template <bool kModulate>
cudaError_t launch_param_grad(DType dt, const void* g, const void* other, const void* mean, const void* rstd,
                              const int64_t* index, void* d1, void* d2, int64_t T, int64_t C, int64_t B,
                              cudaStream_t stream) {
  if (T == 0 || C == 0) return cudaSuccess;
  dim3 block(32, kChunksPerBlock);
  dim3 grid(ceil_div(C, 32), ceil_div(T, kRowsPerChunk * kChunksPerBlock));
  dispatch(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    param_grad_kernel<scalar_t, acc_t, kModulate><<<grid, block, 0, stream>>>(
        static_cast<const scalar_t*>(g), static_cast<const scalar_t*>(other), static_cast<const acc_t*>(mean),
        static_cast<const acc_t*>(rstd), index, static_cast<acc_t*>(d1), static_cast<acc_t*>(d2), T, C, B);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t layernorm_modulate_fwd(DType dt, const void* x, const void* shift, const void* scale,
                                   const int64_t* index, void* out, void* mean, void* rstd, int64_t T, int64_t C,
                                   int64_t B, double eps, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    lnm_fwd_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(shift), static_cast<const scalar_t*>(scale),
        index, static_cast<scalar_t*>(out), static_cast<acc_t*>(mean), static_cast<acc_t*>(rstd), T, C, B,
        static_cast<acc_t>(eps));
  });
  return cudaGetLastError();
}

cudaError_t layernorm_modulate_bwd(DType dt, const void* grad_out, const void* x, const void* scale,
                                   const int64_t* index, const void* mean, const void* rstd, void* grad_x,
                                   void* dshift, void* dscale, int64_t T, int64_t C, int64_t B, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  dispatch(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    lnm_bwd_dx_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        static_cast<const scalar_t*>(grad_out), static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(scale),
        index, static_cast<const acc_t*>(mean), static_cast<const acc_t*>(rstd), static_cast<scalar_t*>(grad_x), T,
        C, B);
  });
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  return launch_param_grad<true>(dt, grad_out, x, mean, rstd, index, dscale, dshift, T, C, B, stream);
}

cudaError_t gated_apply(DType dt, const void* x, const void* y, const void* gate, const int64_t* index, void* out,
                        int64_t T, int64_t C, int64_t B, cudaStream_t stream) {
  const int64_t n = T * C;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
  dispatch(dt, [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    gated_fwd_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(
        static_cast<const scalar_t*>(x), static_cast<const scalar_t*>(y), static_cast<const scalar_t*>(gate), index,
        static_cast<scalar_t*>(out), n, C, B);
  });
  return cudaGetLastError();
}

cudaError_t gated_param_grad(DType dt, const void* grad_out, const void* y, const int64_t* index, void* dgate,
                             int64_t T, int64_t C, int64_t B, cudaStream_t stream) {
  return launch_param_grad<false>(dt, grad_out, y, nullptr, nullptr, index, dgate, nullptr, T, C, B, stream);
}

}  // namespace cuda
}  // namespace elit
