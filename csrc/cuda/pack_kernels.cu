// CUDA latent pack/unpack through ElitLayout.pack_index: row gathers/scatters, dtype-agnostic,
// using the widest vector (16/8/4/2/1 bytes) the row size and pointer alignment allow.
// pack_index rows are unique (the layout builds them so), which makes the unpack scatter race-free.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstdint>

#include "cuda_common.cuh"

namespace elit {
namespace {

static KernelRegistrar reg_pack("pack_latents_cuda");

template <typename V, bool kGather>
__global__ void copy_rows_kernel(const V* __restrict__ src, V* __restrict__ dst, const int64_t* __restrict__ idx,
                                 int64_t rows, int64_t row_vecs, int64_t bound) {
  const int64_t n = rows * row_vecs;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / row_vecs, c = i - t * row_vecs, r = idx[t];
    CUDA_KERNEL_ASSERT(r >= 0 && r < bound);
    if (kGather)
      dst[t * row_vecs + c] = src[r * row_vecs + c];
    else
      dst[r * row_vecs + c] = src[t * row_vecs + c];
  }
}

template <typename V>
void launch_copy(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, int64_t bound,
                 bool gather) {
  const int64_t row_vecs = row_bytes / sizeof(V), n = rows * row_vecs;
  if (n == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
  if (gather)
    copy_rows_kernel<V, true><<<blocks, 256, 0, stream>>>(static_cast<const V*>(src), static_cast<V*>(dst), idx,
                                                           rows, row_vecs, bound);
  else
    copy_rows_kernel<V, false><<<blocks, 256, 0, stream>>>(static_cast<const V*>(src), static_cast<V*>(dst), idx,
                                                            rows, row_vecs, bound);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, int64_t bound,
               bool gather) {
  const auto align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uintptr_t>(row_bytes);
  if (align % 16 == 0)
    launch_copy<uint4>(src, dst, idx, rows, row_bytes, bound, gather);
  else if (align % 8 == 0)
    launch_copy<uint2>(src, dst, idx, rows, row_bytes, bound, gather);
  else if (align % 4 == 0)
    launch_copy<uint32_t>(src, dst, idx, rows, row_bytes, bound, gather);
  else if (align % 2 == 0)
    launch_copy<uint16_t>(src, dst, idx, rows, row_bytes, bound, gather);
  else
    launch_copy<uint8_t>(src, dst, idx, rows, row_bytes, bound, gather);
}

void check_pack_index(const at::Tensor& idx, const at::Tensor& ref, const char* ref_name) {
  check_tensor(idx, "pack_index", 1);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "pack_index: expected dtype int64, got ", idx.scalar_type());
  check_same_device(idx, "pack_index", ref, ref_name);
}

at::Tensor pack_latents_cuda(const at::Tensor& latents_, const at::Tensor& index_) {
  check_tensor(latents_, "latents", 4);
  check_cuda(latents_, "latents");
  check_pack_index(index_, latents_, "latents");
  c10::cuda::CUDAGuard guard(latents_.device());
  auto latents = latents_.contiguous(), index = index_.contiguous();
  const int64_t grid_rows = latents.size(0) * latents.size(1) * latents.size(2), C = latents.size(3);
  auto out = at::empty({index.size(0), C}, latents.options());
  copy_rows(latents.const_data_ptr(), out.mutable_data_ptr(), index.const_data_ptr<int64_t>(), index.size(0),
            C * latents.element_size(), grid_rows, true);
  return out;
}

at::Tensor unpack_latents_cuda(const at::Tensor& packed_, const at::Tensor& index_, int64_t batch, int64_t groups,
                               int64_t j_max, double fill) {
  check_tensor(packed_, "packed", 2);
  check_cuda(packed_, "packed");
  check_pack_index(index_, packed_, "packed");
  TORCH_CHECK(index_.size(0) == packed_.size(0), "pack_index: has ", index_.size(0), " entries, packed has ",
              packed_.size(0), " rows");
  TORCH_CHECK(batch >= 0, "batch: must be >= 0, got ", batch);
  TORCH_CHECK(groups >= 0, "groups: must be >= 0, got ", groups);
  TORCH_CHECK(j_max >= 0, "j_max: must be >= 0, got ", j_max);
  c10::cuda::CUDAGuard guard(packed_.device());
  auto packed = packed_.contiguous(), index = index_.contiguous();
  const int64_t C = packed.size(1);
  auto out = at::full({batch, groups, j_max, C}, fill, packed.options());
  copy_rows(packed.const_data_ptr(), out.mutable_data_ptr(), index.const_data_ptr<int64_t>(), index.size(0),
            C * packed.element_size(), batch * groups * j_max, false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CUDA, m) {
  m.impl("pack_latents", &pack_latents_cuda);
  m.impl("unpack_latents", &unpack_latents_cuda);
}

}  // namespace elit
