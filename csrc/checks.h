// The argument checks of every elit:: op, one function per op (elit::checks::<op>), run at the top of its
// CPU and CUDA entry points before anything is allocated or launched.
//
// Kernels::kCuda adds what the CUDA kernels can take (dtypes, head dims, grid and index-type limits, no
// sliding window or softcap) to the checks every implementation shares (shapes, dtypes, devices). It does
// not check that the tensors are on a GPU (the CUDA entry points do that first, with check_cuda), so the
// same checks run on CPU tensors through elit_kernels._C.checks.<op>(..., cuda=True), which is how they
// are tested on machines without a GPU. Kernels::kCpu also reads the values of cu_seqlens / index tensors
// on the CPU (the CUDA entry points never read them: that would make the host wait for the GPU).
//
// Errors are c10::Error (RuntimeError in Python): "<op>: <argument>: <what is wrong, and the valid values>".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <utility>

#include "elit_common.h"
#include "kernel_limits.h"

namespace elit {

enum class Kernels { kCpu, kCuda };

namespace checks {

// Runs f, prefixing the message of a failed check with the op's name.
template <typename F>
inline void for_op(const char* op, F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": ", e.msg());
  }
}

inline std::string head_dims_text() {
  std::string s;
  const int64_t n = sizeof(cuda::kHeadDims) / sizeof(cuda::kHeadDims[0]);
  for (int64_t i = 0; i < n; ++i) {
    s += std::to_string(cuda::kHeadDims[i]);
    if (i + 2 < n) s += ", ";
    else if (i + 2 == n) s += " or ";
  }
  return s;
}

// What the CUDA attention kernels take (forward and backward alike).
inline void cuda_attention_limits(const at::Tensor& q, const at::Tensor& k, int64_t window_left,
                                  int64_t window_right, double softcap) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, "q: dtype ", q.scalar_type(),
              " is not supported by the CUDA kernels (float16 or bfloat16)");
  const int64_t d = q.size(2);
  bool native = false;
  for (int64_t n : cuda::kHeadDims) native = native || d == n;
  TORCH_CHECK(native, "q: head dim ", d, " is not supported by the CUDA kernels (", head_dims_text(),
              "; elit_kernels.varlen_attention zero-pads smaller head dims)");
  TORCH_CHECK(q.size(1) <= cuda::kMaxGridYZ, "q: ", q.size(1), " heads is more than the CUDA kernels take (at most ",
              cuda::kMaxGridYZ, ")");
  TORCH_CHECK(q.size(0) <= cuda::kMaxAttnRows, "q: ", q.size(0), " rows is more than the CUDA kernels take (at most ",
              cuda::kMaxAttnRows, ", the int32 range of cu_seqlens)");
  TORCH_CHECK(k.size(0) <= cuda::kMaxAttnRows, "k: ", k.size(0), " rows is more than the CUDA kernels take (at most ",
              cuda::kMaxAttnRows, ", the int32 range of cu_seqlens)");
  // The CUDA kernels have no sliding window and no soft-capping (the cuda backend declares it in
  // elit_kernels._cext, so dispatch never sends them here); a direct op call is refused, not ignored.
  TORCH_CHECK(window_left == -1 && window_right == -1, "window_size: the CUDA kernels support only (-1, -1), got (",
              window_left, ", ", window_right, "); use the triton backend");
  TORCH_CHECK(softcap == 0.0, "softcap: the CUDA kernels support only 0.0, got ", softcap, "; use the triton backend");
}

inline void cu_values(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len, const char* max_name) {
  if (cu.is_cpu()) check_cu_values_cpu(cu.contiguous(), name, total, max_len, max_name);
}

inline void index_values(const at::Tensor& index, int64_t bound, const char* name, const char* what) {
  if (index.is_cpu()) check_index_values_cpu(index.contiguous(), bound, name, what);
}

inline void varlen_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k, int64_t window_left,
                            int64_t window_right, double softcap, Kernels kernels) {
  for_op("varlen_attn_fwd", [&] {
    check_attention_args(q, k, v, cu_q, cu_k, max_q, max_k);
    check_mask_args(window_left, window_right, softcap);
    if (kernels == Kernels::kCuda) {
      cuda_attention_limits(q, k, window_left, window_right, softcap);
    } else {
      cu_values(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
      cu_values(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
    }
  });
}

inline void varlen_attn_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                            const at::Tensor& cu_k, int64_t max_q, int64_t max_k, int64_t window_left,
                            int64_t window_right, double softcap, Kernels kernels) {
  for_op("varlen_attn_bwd", [&] {
    check_attention_args(q, k, v, cu_q, cu_k, max_q, max_k);
    check_mask_args(window_left, window_right, softcap);
    check_attention_bwd_extras(dout, out, lse, q);
    if (kernels == Kernels::kCuda) {
      cuda_attention_limits(q, k, window_left, window_right, softcap);
      // The delta kernel: one warp per (row, head), kDeltaRowsPerBlock of them per block along grid.x.
      TORCH_CHECK(q.size(0) * q.size(1) <= cuda::kMaxGridX * cuda::kDeltaRowsPerBlock, "q: ", q.size(0),
                  " rows x ", q.size(1), " heads is more than the CUDA backward takes (at most ",
                  cuda::kMaxGridX * cuda::kDeltaRowsPerBlock, ")");
    } else {
      cu_values(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
      cu_values(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
    }
  });
}

// Token counts the CUDA elementwise kernels take: one warp per row (grid.x), and for the parameter
// gradients of the backward, kParamGradTokensPerBlock tokens per block along grid.y.
inline void cuda_rows_limit(const at::Tensor& x, const char* name, bool param_grad) {
  const int64_t T = x.size(0);
  TORCH_CHECK(T <= cuda::kMaxGridX * cuda::kNormRowsPerBlock, name, ": ", T,
              " tokens is more than the CUDA kernels take (at most ", cuda::kMaxGridX * cuda::kNormRowsPerBlock, ")");
  if (param_grad)
    TORCH_CHECK(T <= cuda::kMaxGridYZ * cuda::kParamGradTokensPerBlock, name, ": ", T,
                " tokens is more than the CUDA backward's parameter-gradient kernel takes (at most ",
                cuda::kMaxGridYZ * cuda::kParamGradTokensPerBlock, ")");
}

inline void layernorm_modulate_fwd(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                   const at::Tensor& index, double eps, Kernels kernels) {
  for_op("layernorm_modulate_fwd", [&] {
    check_layernorm_modulate_fwd_args(x, shift, scale, index, eps);
    if (kernels == Kernels::kCuda)
      cuda_rows_limit(x, "x", false);
    else
      index_values(index, shift.size(0), "index", "a row of shift/scale");
  });
}

inline void layernorm_modulate_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& index, const at::Tensor& mean, const at::Tensor& rstd,
                                   Kernels kernels) {
  for_op("layernorm_modulate_bwd", [&] {
    check_layernorm_modulate_bwd_args(grad_out, x, scale, index, mean, rstd);
    if (kernels == Kernels::kCuda)
      cuda_rows_limit(x, "x", true);
    else
      index_values(index, scale.size(0), "index", "a row of scale");
  });
}

inline void gated_residual_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate,
                               const at::Tensor& index, Kernels kernels) {
  for_op("gated_residual_fwd", [&] {
    check_gated_args(x, y, gate, index, "x");
    if (kernels == Kernels::kCpu) index_values(index, gate.size(0), "index", "a row of gate");
  });
}

inline void gated_residual_bwd(const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& gate,
                               const at::Tensor& index, Kernels kernels) {
  for_op("gated_residual_bwd", [&] {
    check_gated_args(grad_out, y, gate, index, "grad_out");
    if (kernels == Kernels::kCuda)
      cuda_rows_limit(grad_out, "grad_out", true);
    else
      index_values(index, gate.size(0), "index", "a row of gate");
  });
}

}  // namespace checks
}  // namespace elit
