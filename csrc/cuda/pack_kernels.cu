// CUDA latent pack/unpack kernels (ATen glue: pack_cuda.cpp): row gathers/scatters through
// ElitLayout.pack_index, dtype-agnostic, using the widest vector (16/8/4/2/1 bytes) that the row size
// and pointer alignment allow. pack_index rows are unique (the layout builds them so), which makes
// the unpack scatter race-free.
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace elit {
namespace cuda {
namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
cudaError_t launch_copy(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, int64_t bound,
                        bool gather, cudaStream_t stream) {
  const int64_t row_vecs = row_bytes / sizeof(V), n = rows * row_vecs;
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
  if (gather)
    copy_rows_kernel<V, true><<<blocks, 256, 0, stream>>>(static_cast<const V*>(src), static_cast<V*>(dst), idx,
                                                           rows, row_vecs, bound);
  else
    copy_rows_kernel<V, false><<<blocks, 256, 0, stream>>>(static_cast<const V*>(src), static_cast<V*>(dst), idx,
                                                            rows, row_vecs, bound);
  return cudaGetLastError();
}

}  // namespace

cudaError_t copy_rows(const void* src, void* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, int64_t bound,
               bool gather, cudaStream_t stream) {
  const auto align = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                     static_cast<uintptr_t>(row_bytes);
  if (align % 16 == 0)
    return launch_copy<uint4>(src, dst, idx, rows, row_bytes, bound, gather, stream);
  else if (align % 8 == 0)
    return launch_copy<uint2>(src, dst, idx, rows, row_bytes, bound, gather, stream);
  else if (align % 4 == 0)
    return launch_copy<uint32_t>(src, dst, idx, rows, row_bytes, bound, gather, stream);
  else if (align % 2 == 0)
    return launch_copy<uint16_t>(src, dst, idx, rows, row_bytes, bound, gather, stream);
  else
    return launch_copy<uint8_t>(src, dst, idx, rows, row_bytes, bound, gather, stream);
}


}  // namespace cuda
}  // namespace elit
