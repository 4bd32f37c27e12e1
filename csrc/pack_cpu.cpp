// CPU latent pack/unpack through ElitLayout.pack_index: row copies, dtype-agnostic (memcpy).
// pack:   [B, G, J_max, C] -> [T, C],   out[t] = latents.flat[pack_index[t]]
// unpack: [T, C] -> [B, G, J_max, C],   fill everywhere, then out.flat[pack_index[t]] = packed[t]
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <cstring>

#include "checks.h"
#include "elit_common.h"

namespace elit {
namespace {

static KernelRegistrar reg_pack("pack_latents_cpu");

void copy_rows(const char* src, char* dst, const int64_t* idx, int64_t rows, int64_t row_bytes, bool gather) {
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t s = gather ? idx[t] : t, d = gather ? t : idx[t];
      std::memcpy(dst + d * row_bytes, src + s * row_bytes, row_bytes);
    }
  });
}

at::Tensor pack_latents_cpu(const at::Tensor& latents_, const at::Tensor& index_) {
  checks::pack_latents(latents_, index_, Kernels::kCpu);
  auto latents = latents_.contiguous(), index = index_.contiguous();
  const int64_t C = latents.size(3);
  auto out = at::empty({index.size(0), C}, latents.options());
  copy_rows(static_cast<const char*>(latents.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
            index.const_data_ptr<int64_t>(), index.size(0), C * latents.element_size(), true);
  return out;
}

at::Tensor unpack_latents_cpu(const at::Tensor& packed_, const at::Tensor& index_, int64_t batch, int64_t groups,
                              int64_t j_max, double fill) {
  checks::unpack_latents(packed_, index_, batch, groups, j_max, Kernels::kCpu);
  auto packed = packed_.contiguous(), index = index_.contiguous();
  const int64_t C = packed.size(1);
  auto out = at::full({batch, groups, j_max, C}, fill, packed.options());
  copy_rows(static_cast<const char*>(packed.const_data_ptr()), static_cast<char*>(out.mutable_data_ptr()),
            index.const_data_ptr<int64_t>(), index.size(0), C * packed.element_size(), false);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CPU, m) {
  m.impl("pack_latents", &pack_latents_cpu);
  m.impl("unpack_latents", &unpack_latents_cpu);
}

}  // namespace elit
