// CPU ragged elementwise ops: LayerNorm(no affine) + adaLN modulate, and the gated residual add.
// Semantics: elit_kernels/reference/modulate.py. Per-sample parameters [B, C] are gathered through
// index [T]. Parameter gradients are reduced per channel block, in token order: deterministic and
// independent of the thread count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "elit_common.h"

namespace elit {
namespace {

static KernelRegistrar reg_lnm("layernorm_modulate_cpu");
static KernelRegistrar reg_gr("gated_residual_cpu");

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_fwd_cpu(const at::Tensor& x_, const at::Tensor& shift_,
                                                                          const at::Tensor& scale_,
                                                                          const at::Tensor& index_, double eps) {
  checks::layernorm_modulate_fwd(x_, shift_, scale_, index_, eps, Kernels::kCpu);
  auto x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  const int64_t T = x.size(0), C = x.size(1);
  auto out = new_output_like(x);
  auto mean = new_output({T}, x.options().dtype(stat_dtype(x)));
  auto rstd = new_output({T}, x.options().dtype(stat_dtype(x)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_modulate_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* sh = shift.const_data_ptr<scalar_t>();
    const scalar_t* scp = scale.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* rp = rstd.mutable_data_ptr<acc_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* xr = xp + t * C;
        acc_t mu = 0, var = 0;
        for (int64_t c = 0; c < C; ++c) mu += static_cast<acc_t>(xr[c]);
        mu /= C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = static_cast<acc_t>(xr[c]) - mu;
          var += d * d;
        }
        const acc_t rs = acc_t(1) / std::sqrt(var / C + static_cast<acc_t>(eps));
        mp[t] = mu;
        rp[t] = rs;
        const int64_t s = ip[t];
        for (int64_t c = 0; c < C; ++c) {
          const acc_t h = (static_cast<acc_t>(xr[c]) - mu) * rs;
          op[t * C + c] = static_cast<scalar_t>(h * (acc_t(1) + static_cast<acc_t>(scp[s * C + c])) +
                                                static_cast<acc_t>(sh[s * C + c]));
        }
      }
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_bwd_cpu(const at::Tensor& g_, const at::Tensor& x_,
                                                                          const at::Tensor& scale_,
                                                                          const at::Tensor& index_,
                                                                          const at::Tensor& mean_,
                                                                          const at::Tensor& rstd_) {
  checks::layernorm_modulate_bwd(g_, x_, scale_, index_, mean_, rstd_, Kernels::kCpu);
  auto g = g_.contiguous(), x = x_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t T = x.size(0), C = x.size(1), B = scale.size(0);
  auto gx = new_output_like(x);
  auto gshift = new_output({B, C}, x.options());
  auto gscale = new_output({B, C}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_modulate_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* scp = scale.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = rstd.const_data_ptr<acc_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    // dx = rstd * (gh - mean(gh) - xhat * mean(gh * xhat)), gh = grad_out * (1 + scale[index]).
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t s = ip[t];
        acc_t a = 0, bsum = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gh = static_cast<acc_t>(gp[t * C + c]) * (acc_t(1) + static_cast<acc_t>(scp[s * C + c]));
          const acc_t xh = (static_cast<acc_t>(xp[t * C + c]) - mp[t]) * rp[t];
          a += gh;
          bsum += gh * xh;
        }
        a /= C;
        bsum /= C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gh = static_cast<acc_t>(gp[t * C + c]) * (acc_t(1) + static_cast<acc_t>(scp[s * C + c]));
          const acc_t xh = (static_cast<acc_t>(xp[t * C + c]) - mp[t]) * rp[t];
          gxp[t * C + c] = static_cast<scalar_t>(rp[t] * (gh - a - xh * bsum));
        }
      }
    });
    scalar_t* gsh = gshift.mutable_data_ptr<scalar_t>();
    scalar_t* gsc = gscale.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 32, [&](int64_t cb, int64_t ce) {
      const int64_t w = ce - cb;
      std::vector<acc_t> ash(B * w, acc_t(0)), asc(B * w, acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = ip[t];
        for (int64_t c = cb; c < ce; ++c) {
          const acc_t gv = static_cast<acc_t>(gp[t * C + c]);
          ash[s * w + c - cb] += gv;
          asc[s * w + c - cb] += gv * (static_cast<acc_t>(xp[t * C + c]) - mp[t]) * rp[t];
        }
      }
      for (int64_t s = 0; s < B; ++s)
        for (int64_t c = cb; c < ce; ++c) {
          gsh[s * C + c] = static_cast<scalar_t>(ash[s * w + c - cb]);
          gsc[s * C + c] = static_cast<scalar_t>(asc[s * w + c - cb]);
        }
    });
  });
  return {gx, gshift, gscale};
}


at::Tensor gated_residual_fwd_cpu(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& gate_,
                                  const at::Tensor& index_) {
  checks::gated_residual_fwd(x_, y_, gate_, index_, Kernels::kCpu);
  auto x = x_.contiguous(), y = y_.contiguous(), gate = gate_.contiguous(), index = index_.contiguous();
  const int64_t T = x.size(0), C = x.size(1);
  auto out = new_output_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_residual_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *xp = x.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gp = gate.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const scalar_t* gr = gp + ip[t] * C;
        for (int64_t c = 0; c < C; ++c)
          op[t * C + c] = static_cast<scalar_t>(static_cast<acc_t>(xp[t * C + c]) +
                                                static_cast<acc_t>(gr[c]) * static_cast<acc_t>(yp[t * C + c]));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cpu(const at::Tensor& g_, const at::Tensor& y_,
                                                          const at::Tensor& gate_, const at::Tensor& index_) {
  checks::gated_residual_bwd(g_, y_, gate_, index_, Kernels::kCpu);
  auto g = g_.contiguous(), y = y_.contiguous(), gate = gate_.contiguous(), index = index_.contiguous();
  const int64_t T = g.size(0), C = g.size(1), B = gate.size(0);
  auto gy = new_output_like(y);
  auto ggate = new_output({B, C}, gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gated_residual_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *yp = y.const_data_ptr<scalar_t>();
    const scalar_t* gtp = gate.const_data_ptr<scalar_t>();
    const int64_t* ip = index.const_data_ptr<int64_t>();
    scalar_t* gyp = gy.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        for (int64_t c = 0; c < C; ++c)
          gyp[t * C + c] = static_cast<scalar_t>(static_cast<acc_t>(gp[t * C + c]) *
                                                 static_cast<acc_t>(gtp[ip[t] * C + c]));
    });
    scalar_t* ggp = ggate.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, C, 32, [&](int64_t cb, int64_t ce) {
      const int64_t w = ce - cb;
      std::vector<acc_t> acc(B * w, acc_t(0));
      for (int64_t t = 0; t < T; ++t) {
        const int64_t s = ip[t];
        for (int64_t c = cb; c < ce; ++c)
          acc[s * w + c - cb] += static_cast<acc_t>(gp[t * C + c]) * static_cast<acc_t>(yp[t * C + c]);
      }
      for (int64_t s = 0; s < B; ++s)
        for (int64_t c = cb; c < ce; ++c) ggp[s * C + c] = static_cast<scalar_t>(acc[s * w + c - cb]);
    });
  });
  return {gy, ggate};
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CPU, m) {
  m.impl("layernorm_modulate_fwd", &layernorm_modulate_fwd_cpu);
  m.impl("layernorm_modulate_bwd", &layernorm_modulate_bwd_cpu);
  m.impl("gated_residual_fwd", &gated_residual_fwd_cpu);
  m.impl("gated_residual_bwd", &gated_residual_bwd_cpu);
}

}  // namespace elit
