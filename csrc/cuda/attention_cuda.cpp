// ATen glue of the CUDA varlen attention (kernels: attention_fwd.cu, attention_bwd.cu): argument
// checks (checks.h, Kernels::kCuda), allocation, strides. Values of cu_seqlens are not read here (that
// would sync the host); elit_kernels.varlen_attention validates them in eager mode, and the kernels size
// their grids from the packed row counts so that a wrong max_seqlen under torch.compile still gives the
// right answer.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "glue.h"

namespace elit {
namespace {

static KernelRegistrar reg_fwd("varlen_attn_fwd_cuda");
static KernelRegistrar reg_bwd("varlen_attn_bwd_cuda");

// Row views the kernels load with 16-byte vectors as they are (unit stride along D, row and head strides
// multiples of 8 elements, 16-byte aligned base: the q/k/v views of a packed qkv pass); anything else is
// copied once.
at::Tensor loadable(const at::Tensor& t) {
  const bool ok = t.stride(2) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  if (ok) return t;
  auto c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// Contiguous and 16-byte aligned (the delta kernel reads out/dout as plain [total_q, H, D]).
at::Tensor aligned(const at::Tensor& t) {
  auto c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

cuda::AttnParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                             const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double scale, bool causal) {
  cuda::AttnParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.cu_q = cu_q.const_data_ptr<int32_t>();
  p.cu_k = cu_k.const_data_ptr<int32_t>();
  p.segs = cu_q.size(0) - 1;
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.head_dim = q.size(2);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.max_q = max_q;
  p.max_k = max_k;
  p.q_st = q.stride(0);
  p.q_sh = q.stride(1);
  p.k_st = k.stride(0);
  p.k_sh = k.stride(1);
  p.v_st = v.stride(0);
  p.v_sh = v.stride(1);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.bf16 = q.scalar_type() == at::kBFloat16;
  return p;
}

// Outputs are contiguous whatever the input strides (the fake impls in elit_kernels._cext promise it).
std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cuda(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, const at::Tensor& cu_q_,
                                                        const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
                                                        double scale, bool causal, int64_t window_left,
                                                        int64_t window_right, double softcap) {
  check_cuda(q_, "varlen_attn_fwd: q");
  checks::varlen_attn_fwd(q_, k_, v_, cu_q_, cu_k_, max_q, max_k, window_left, window_right, softcap,
                          Kernels::kCuda);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = loadable(q_), k = loadable(k_), v = loadable(v_);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  auto p = base_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
  p.o = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  C10_CUDA_CHECK(cuda::varlen_attn_fwd(p, current_stream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cuda(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap) {
  check_cuda(q_, "varlen_attn_bwd: q");
  // fp16/bf16 only here, so lse is float32
  checks::varlen_attn_bwd(dout_, q_, k_, v_, out_, lse_, cu_q_, cu_k_, max_q, max_k, window_left, window_right,
                          softcap, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = loadable(q_), k = loadable(k_), v = loadable(v_), out = aligned(out_), dout = aligned(dout_);
  auto lse = lse_.contiguous(), cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  auto dq = new_output(q.sizes(), q.options()), dk = new_output(k.sizes(), k.options());
  auto dv = new_output(v.sizes(), v.options());
  auto delta = new_output({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  auto p = base_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal);
  p.out = out.const_data_ptr();
  p.dout = dout.const_data_ptr();
  p.lse_in = lse.const_data_ptr<float>();
  p.delta = delta.mutable_data_ptr<float>();
  p.dq = dq.mutable_data_ptr();
  p.dk = dk.mutable_data_ptr();
  p.dv = dv.mutable_data_ptr();
  C10_CUDA_CHECK(cuda::varlen_attn_bwd(p, current_stream()));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CUDA, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cuda);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cuda);
}

}  // namespace elit
