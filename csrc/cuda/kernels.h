// Plain-C++ interface between the CUDA kernels (*.cu, compiled by nvcc without any ATen header, which
// keeps nvcc's per-architecture front-end passes cheap) and their ATen glue (*_cuda.cpp, g++).
// Pointers are raw device pointers of contiguous tensors; every launcher returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_limits.h"  // kHeadDims, grid limits: what the glue checks before launching

namespace elit {
namespace cuda {

enum class DType { kFloat, kDouble, kHalf, kBFloat16 };

struct AttnParams {
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // q [total_q, H, D], k/v [total_k, H_kv, D], strided rows
  const void *out = nullptr, *dout = nullptr;           // backward inputs
  void *o = nullptr;                                    // forward output
  float* lse = nullptr;                                 // forward output [H, total_q]
  const float* lse_in = nullptr;                        // backward input
  float* delta = nullptr;                               // backward scratch [H, total_q]
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  const int32_t *cu_q = nullptr, *cu_k = nullptr;
  int64_t segs = 0, heads = 0, kv_heads = 0, head_dim = 0, total_q = 0, total_k = 0, max_q = 0, max_k = 0;
  // Element strides of q/k/v rows (token) and heads, multiples of 8 (16-byte vectors); outputs are contiguous.
  int64_t q_st = 0, q_sh = 0, k_st = 0, k_sh = 0, v_st = 0, v_sh = 0;
  float scale = 1.f;
  bool causal = false, bf16 = false;
};

cudaError_t varlen_attn_fwd(const AttnParams& p, cudaStream_t stream);
cudaError_t varlen_attn_bwd(const AttnParams& p, cudaStream_t stream);

cudaError_t layernorm_modulate_fwd(DType dt, const void* x, const void* shift, const void* scale,
                                   const int64_t* index, void* out, void* mean, void* rstd, int64_t T, int64_t C,
                                   int64_t B, double eps, cudaStream_t stream);
// dshift/dscale are zero-initialised accumulators in the stat dtype (fp32, fp64 for fp64 x).
cudaError_t layernorm_modulate_bwd(DType dt, const void* grad_out, const void* x, const void* scale,
                                   const int64_t* index, const void* mean, const void* rstd, void* grad_x,
                                   void* dshift, void* dscale, int64_t T, int64_t C, int64_t B, cudaStream_t stream);
// out = (x or 0 when null) + gate[index] * y
cudaError_t gated_apply(DType dt, const void* x, const void* y, const void* gate, const int64_t* index, void* out,
                        int64_t T, int64_t C, int64_t B, cudaStream_t stream);
// dgate (zeroed accumulator, stat dtype) += segment sums of grad_out * y
cudaError_t gated_param_grad(DType dt, const void* grad_out, const void* y, const int64_t* index, void* dgate,
                             int64_t T, int64_t C, int64_t B, cudaStream_t stream);

cudaError_t copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, int64_t bound,
                      bool gather, cudaStream_t stream);

}  // namespace cuda
}  // namespace elit
