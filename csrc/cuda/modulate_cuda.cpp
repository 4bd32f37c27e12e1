// ATen glue of the CUDA elementwise ops (kernels: modulate_kernels.cu): checks, allocation, dispatch.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "glue.h"

namespace elit {
namespace {

static KernelRegistrar reg_lnm("layernorm_modulate_cuda");
static KernelRegistrar reg_gr("gated_residual_cuda");

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_fwd_cuda(const at::Tensor& x_, const at::Tensor& shift_,
                                                                           const at::Tensor& scale_,
                                                                           const at::Tensor& index_, double eps) {
  check_cuda(x_, "layernorm_modulate_fwd: x");
  checks::layernorm_modulate_fwd(x_, shift_, scale_, index_, eps, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  const int64_t T = x.size(0), C = x.size(1), B = shift.size(0);
  auto out = new_output_like(x);
  auto mean = new_output({T}, x.options().dtype(stat_dtype(x)));
  auto rstd = new_output({T}, x.options().dtype(stat_dtype(x)));
  C10_CUDA_CHECK(cuda::layernorm_modulate_fwd(to_dtype(x.scalar_type()), x.const_data_ptr(), shift.const_data_ptr(),
                                              scale.const_data_ptr(), index.const_data_ptr<int64_t>(),
                                              out.mutable_data_ptr(), mean.mutable_data_ptr(), rstd.mutable_data_ptr(),
                                              T, C, B, eps, current_stream()));
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_bwd_cuda(const at::Tensor& g_, const at::Tensor& x_,
                                                                           const at::Tensor& scale_,
                                                                           const at::Tensor& index_,
                                                                           const at::Tensor& mean_,
                                                                           const at::Tensor& rstd_) {
  check_cuda(x_, "layernorm_modulate_bwd: x");
  checks::layernorm_modulate_bwd(g_, x_, scale_, index_, mean_, rstd_, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(x_.device());
  auto g = g_.contiguous(), x = x_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t T = x.size(0), C = x.size(1), B = scale.size(0);
  auto gx = new_output_like(x);
  auto acc_opts = x.options().dtype(stat_dtype(x));
  auto dscale = at::zeros({B, C}, acc_opts), dshift = at::zeros({B, C}, acc_opts);
  C10_CUDA_CHECK(cuda::layernorm_modulate_bwd(to_dtype(x.scalar_type()), g.const_data_ptr(), x.const_data_ptr(),
                                              scale.const_data_ptr(), index.const_data_ptr<int64_t>(),
                                              mean.const_data_ptr(), rstd.const_data_ptr(), gx.mutable_data_ptr(),
                                              dshift.mutable_data_ptr(), dscale.mutable_data_ptr(), T, C, B,
                                              current_stream()));
  return {gx, dshift.to(x.scalar_type()), dscale.to(x.scalar_type())};
}

// out = (x or 0) + gate[index] * y
at::Tensor gated_apply(const at::Tensor* x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& index) {
  auto out = new_output_like(y);
  C10_CUDA_CHECK(cuda::gated_apply(to_dtype(y.scalar_type()), x ? x->const_data_ptr() : nullptr, y.const_data_ptr(),
                                   gate.const_data_ptr(), index.const_data_ptr<int64_t>(), out.mutable_data_ptr(),
                                   y.size(0), y.size(1), gate.size(0), current_stream()));
  return out;
}

at::Tensor gated_residual_fwd_cuda(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& gate_,
                                   const at::Tensor& index_) {
  check_cuda(x_, "gated_residual_fwd: x");
  checks::gated_residual_fwd(x_, y_, gate_, index_, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  return gated_apply(&x, y_.contiguous(), gate_.contiguous(), index_.contiguous());
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cuda(const at::Tensor& g_, const at::Tensor& y_,
                                                           const at::Tensor& gate_, const at::Tensor& index_) {
  check_cuda(g_, "gated_residual_bwd: grad_out");
  checks::gated_residual_bwd(g_, y_, gate_, index_, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(g_.device());
  auto g = g_.contiguous(), y = y_.contiguous(), gate = gate_.contiguous(), index = index_.contiguous();
  auto gy = gated_apply(nullptr, g, gate, index);
  auto dgate = at::zeros(gate.sizes(), gate.options().dtype(stat_dtype(gate)));
  C10_CUDA_CHECK(cuda::gated_param_grad(to_dtype(g.scalar_type()), g.const_data_ptr(), y.const_data_ptr(),
                                        index.const_data_ptr<int64_t>(), dgate.mutable_data_ptr(), g.size(0),
                                        g.size(1), gate.size(0), current_stream()));
  return {gy, dgate.to(gate.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CUDA, m) {
  m.impl("layernorm_modulate_fwd", &layernorm_modulate_fwd_cuda);
  m.impl("layernorm_modulate_bwd", &layernorm_modulate_bwd_cuda);
  m.impl("gated_residual_fwd", &gated_residual_fwd_cuda);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cuda);
}

}  // namespace elit
