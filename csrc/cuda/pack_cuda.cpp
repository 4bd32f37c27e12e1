// ATen glue of the CUDA latent pack/unpack (kernels: pack_kernels.cu).
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include "glue.h"

namespace elit {
namespace {

static KernelRegistrar reg_pack("pack_latents_cuda");

at::Tensor pack_latents_cuda(const at::Tensor& latents_, const at::Tensor& index_) {
  check_cuda(latents_, "pack_latents: latents");
  checks::pack_latents(latents_, index_, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(latents_.device());
  auto latents = latents_.contiguous(), index = index_.contiguous();
  const int64_t grid_rows = latents.size(0) * latents.size(1) * latents.size(2), C = latents.size(3);
  auto out = at::empty({index.size(0), C}, latents.options());
  C10_CUDA_CHECK(cuda::copy_rows(latents.const_data_ptr(), out.mutable_data_ptr(), index.const_data_ptr<int64_t>(), index.size(0),
            C * latents.element_size(), grid_rows, true,
                                 current_stream()));
  return out;
}

at::Tensor unpack_latents_cuda(const at::Tensor& packed_, const at::Tensor& index_, int64_t batch, int64_t groups,
                               int64_t j_max, double fill) {
  check_cuda(packed_, "unpack_latents: packed");
  checks::unpack_latents(packed_, index_, batch, groups, j_max, Kernels::kCuda);
  c10::cuda::CUDAGuard guard(packed_.device());
  auto packed = packed_.contiguous(), index = index_.contiguous();
  const int64_t C = packed.size(1);
  auto out = at::full({batch, groups, j_max, C}, fill, packed.options());
  C10_CUDA_CHECK(cuda::copy_rows(packed.const_data_ptr(), out.mutable_data_ptr(), index.const_data_ptr<int64_t>(), index.size(0),
            C * packed.element_size(), batch * groups * j_max, false,
                                 current_stream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CUDA, m) {
  m.impl("pack_latents", &pack_latents_cuda);
  m.impl("unpack_latents", &unpack_latents_cuda);
}

}  // namespace elit
