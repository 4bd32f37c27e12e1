// What the CUDA kernels can take, as plain constants: included by the kernels' interface (cuda/kernels.h,
// compiled by nvcc without ATen) and by the host-side argument checks (checks.h), which also run in a
// CPU-only build so that the CUDA entry points' checks can be tested without a GPU.
#pragma once

#include <cstdint>

namespace elit {
namespace cuda {

// Head dims the attention kernels are instantiated for (attn::dispatch_head_dim);
// elit_kernels._cext.CudaBackend.head_dims declares the same list, and the contract zero-pads smaller
// dims up to one of them.
constexpr int64_t kHeadDims[] = {64, 72, 128};
// Grid limits: grid.x counts row tiles, grid.y counts heads (attention) or token chunks (parameter grads).
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
// cu_seqlens are int32 and the attention kernels hold in-segment row counts as int: total_q and total_k
// (rows past cu_seqlens[-1] included) must fit.
constexpr int64_t kMaxAttnRows = 2147483647;
// The attention backward's delta kernel runs one warp per (row, head), 8 warps per block along grid.x.
constexpr int64_t kDeltaRowsPerBlock = 8;
// The elementwise kernels run one warp per token, kNormRowsPerBlock of them per block along grid.x; their
// parameter-gradient kernels give each block along grid.y kParamGradTokensPerBlock tokens.
constexpr int64_t kNormRowsPerBlock = 4;
constexpr int64_t kParamGradTokensPerBlock = 64 * 8;

}  // namespace cuda
}  // namespace elit
