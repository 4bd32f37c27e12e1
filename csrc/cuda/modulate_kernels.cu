// CUDA ragged elementwise ops: LayerNorm(no affine) + adaLN modulate, gated residual; forward and
// backward. Semantics: elit_kernels/reference/modulate.py.
//
// Rows are handled one warp each (C is a model width: 384..1152, two passes over a row stay in L1).
// Per-sample parameter gradients [B, C] are reduced by a column-parallel kernel that walks a chunk of
// tokens and flushes one fp32 atomicAdd per (chunk, sample run), so a sample-sorted index costs
// ~T/64 atomics per column. Atomics make those gradients run-to-run nondeterministic in the last bits.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace elit {
namespace {

static KernelRegistrar reg_lnm("layernorm_modulate_cuda");
static KernelRegistrar reg_gr("gated_residual_cuda");

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerChunk = 64;

template <typename scalar_t, typename acc_t>
__global__ void lnm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ shift,
                               const scalar_t* __restrict__ scale, const int64_t* __restrict__ index,
                               scalar_t* __restrict__ out, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                               int64_t T, int64_t C, int64_t B, acc_t eps) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= T) return;
  const scalar_t* xr = x + row * C;
  acc_t s = 0;
  for (int64_t c = lane; c < C; c += 32) s += static_cast<acc_t>(xr[c]);
  const acc_t mu = warp_sum(s) / C;
  acc_t v = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t d = static_cast<acc_t>(xr[c]) - mu;
    v += d * d;
  }
  const acc_t rs = acc_t(1) / sqrt(warp_sum(v) / C + eps);
  if (lane == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
  const int64_t b = index[row];
  CUDA_KERNEL_ASSERT(b >= 0 && b < B);
  const scalar_t* sh = shift + b * C;
  const scalar_t* sc = scale + b * C;
  scalar_t* o = out + row * C;
  for (int64_t c = lane; c < C; c += 32)
    o[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mu) * rs * (acc_t(1) + static_cast<acc_t>(sc[c])) +
                                 static_cast<acc_t>(sh[c]));
}

template <typename scalar_t, typename acc_t>
__global__ void lnm_bwd_dx_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ scale, const int64_t* __restrict__ index,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                  scalar_t* __restrict__ gx, int64_t T, int64_t C, int64_t B) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= T) return;
  const int64_t b = index[row];
  CUDA_KERNEL_ASSERT(b >= 0 && b < B);
  const scalar_t* gr = g + row * C;
  const scalar_t* xr = x + row * C;
  const scalar_t* sc = scale + b * C;
  const acc_t mu = mean[row], rs = rstd[row];
  acc_t a = 0, bs = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t gh = static_cast<acc_t>(gr[c]) * (acc_t(1) + static_cast<acc_t>(sc[c]));
    a += gh;
    bs += gh * (static_cast<acc_t>(xr[c]) - mu) * rs;
  }
  a = warp_sum(a) / C;
  bs = warp_sum(bs) / C;
  scalar_t* o = gx + row * C;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t gh = static_cast<acc_t>(gr[c]) * (acc_t(1) + static_cast<acc_t>(sc[c]));
    const acc_t xh = (static_cast<acc_t>(xr[c]) - mu) * rs;
    o[c] = static_cast<scalar_t>(rs * (gh - a - xh * bs));
  }
}

// kModulate: d1 += g * xhat (dscale), d2 += g (dshift). Otherwise d1 += g * other (dgate).
template <typename scalar_t, typename acc_t, bool kModulate>
__global__ void param_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ other,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                  const int64_t* __restrict__ index, acc_t* __restrict__ d1, acc_t* __restrict__ d2,
                                  int64_t T, int64_t C, int64_t B) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  if (c >= C) return;
  const int64_t t0 = (static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y) * kRowsPerChunk;
  const int64_t t1 = min(T, t0 + kRowsPerChunk);
  acc_t a1 = 0, a2 = 0;
  int64_t cur = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = index[t];
    CUDA_KERNEL_ASSERT(b >= 0 && b < B);
    if (b != cur) {
      if (cur >= 0) {
        atomicAdd(d1 + cur * C + c, a1);
        if (kModulate) atomicAdd(d2 + cur * C + c, a2);
      }
      cur = b;
      a1 = a2 = 0;
    }
    const acc_t gv = static_cast<acc_t>(g[t * C + c]);
    if constexpr (kModulate) {
      a1 += gv * (static_cast<acc_t>(other[t * C + c]) - mean[t]) * rstd[t];
      a2 += gv;
    } else {
      a1 += gv * static_cast<acc_t>(other[t * C + c]);
    }
  }
  if (cur >= 0) {
    atomicAdd(d1 + cur * C + c, a1);
    if (kModulate) atomicAdd(d2 + cur * C + c, a2);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gated_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                                 const scalar_t* __restrict__ gate, const int64_t* __restrict__ index,
                                 scalar_t* __restrict__ out, int64_t n, int64_t C, int64_t B) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / C, c = i - t * C, b = index[t];
    CUDA_KERNEL_ASSERT(b >= 0 && b < B);
    const acc_t gv = static_cast<acc_t>(gate[b * C + c]);
    out[i] = static_cast<scalar_t>((x ? static_cast<acc_t>(x[i]) : acc_t(0)) + gv * static_cast<acc_t>(y[i]));
  }
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void launch_param_grad(bool modulate, const at::Tensor& g, const at::Tensor& other, const at::Tensor* mean,
                       const at::Tensor* rstd, const at::Tensor& index, at::Tensor& d1, at::Tensor* d2, int64_t B) {
  const int64_t T = g.size(0), C = g.size(1);
  if (T == 0 || C == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dim3 block(32, 8);
  dim3 grid(ceil_div(C, 32), ceil_div(T, kRowsPerChunk * 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "elit_param_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (modulate) {
      param_grad_kernel<scalar_t, acc_t, true><<<grid, block, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), other.const_data_ptr<scalar_t>(), mean->const_data_ptr<acc_t>(),
          rstd->const_data_ptr<acc_t>(), index.const_data_ptr<int64_t>(), d1.mutable_data_ptr<acc_t>(),
          d2->mutable_data_ptr<acc_t>(), T, C, B);
    } else {
      param_grad_kernel<scalar_t, acc_t, false><<<grid, block, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), other.const_data_ptr<scalar_t>(), nullptr, nullptr,
          index.const_data_ptr<int64_t>(), d1.mutable_data_ptr<acc_t>(), nullptr, T, C, B);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_fwd_cuda(const at::Tensor& x_, const at::Tensor& shift_,
                                                                           const at::Tensor& scale_,
                                                                           const at::Tensor& index_, double eps) {
  check_tensor(x_, "x", 2);
  check_floating(x_, "x");
  check_cuda(x_, "x");
  check_param(shift_, "shift", x_);
  check_param(scale_, "scale", x_);
  TORCH_CHECK(scale_.size(0) == shift_.size(0), "scale: has ", scale_.size(0), " samples, shift has ", shift_.size(0));
  check_index(index_, x_);
  TORCH_CHECK(eps >= 0, "eps: must be >= 0, got ", eps);
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous(), shift = shift_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  const int64_t T = x.size(0), C = x.size(1), B = shift.size(0);
  auto out = at::empty_like(x);
  auto mean = at::empty({T}, x.options().dtype(stat_dtype(x)));
  auto rstd = at::empty({T}, x.options().dtype(stat_dtype(x)));
  if (T == 0) return {out, mean, rstd};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_modulate_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lnm_fwd_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), shift.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
        index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>(), T, C, B, static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layernorm_modulate_bwd_cuda(const at::Tensor& g_, const at::Tensor& x_,
                                                                           const at::Tensor& scale_,
                                                                           const at::Tensor& index_,
                                                                           const at::Tensor& mean_,
                                                                           const at::Tensor& rstd_) {
  check_tensor(x_, "x", 2);
  check_floating(x_, "x");
  check_cuda(x_, "x");
  TORCH_CHECK(g_.sizes() == x_.sizes(), "grad_out: expected shape ", x_.sizes(), " (x's), got ", g_.sizes());
  check_same_dtype(g_, "grad_out", x_, "x");
  check_same_device(g_, "grad_out", x_, "x");
  check_param(scale_, "scale", x_);
  check_index(index_, x_);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{mean_, "mean"}, {rstd_, "rstd"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x_.size(0), name, ": expected shape [", x_.size(0), "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == stat_dtype(x_), name, ": expected dtype ", stat_dtype(x_), ", got ",
                t.scalar_type());
    check_same_device(t, name, x_, "x");
  }
  c10::cuda::CUDAGuard guard(x_.device());
  auto g = g_.contiguous(), x = x_.contiguous(), scale = scale_.contiguous(), index = index_.contiguous();
  auto mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t T = x.size(0), C = x.size(1), B = scale.size(0);
  auto gx = at::empty_like(x);
  auto acc_opts = x.options().dtype(stat_dtype(x));
  auto dscale = at::zeros({B, C}, acc_opts), dshift = at::zeros({B, C}, acc_opts);
  if (T > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layernorm_modulate_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      lnm_bwd_dx_kernel<scalar_t, acc_t><<<ceil_div(T, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), scale.const_data_ptr<scalar_t>(),
          index.const_data_ptr<int64_t>(), mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
          gx.mutable_data_ptr<scalar_t>(), T, C, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launch_param_grad(true, g, x, &mean, &rstd, index, dscale, &dshift, B);
  }
  return {gx, dshift.to(x.scalar_type()), dscale.to(x.scalar_type())};
}

void check_gated_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& index,
                      const char* xname) {
  check_tensor(x, xname, 2);
  check_floating(x, xname);
  check_cuda(x, xname);
  TORCH_CHECK(y.sizes() == x.sizes(), "y: expected shape ", x.sizes(), " (", xname, "'s), got ", y.sizes());
  check_same_dtype(y, "y", x, xname);
  check_same_device(y, "y", x, xname);
  check_param(gate, "gate", x);
  check_index(index, x);
}

// out = (x or 0) + gate[index] * y
at::Tensor gated_apply(const at::Tensor* x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& index) {
  auto out = at::empty_like(y);
  const int64_t n = y.numel(), C = y.size(1), B = gate.size(0);
  if (n == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "gated_residual_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gated_fwd_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(
        x ? x->const_data_ptr<scalar_t>() : nullptr, y.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
        index.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>(), n, C, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor gated_residual_fwd_cuda(const at::Tensor& x_, const at::Tensor& y_, const at::Tensor& gate_,
                                   const at::Tensor& index_) {
  check_gated_cuda(x_, y_, gate_, index_, "x");
  c10::cuda::CUDAGuard guard(x_.device());
  auto x = x_.contiguous();
  return gated_apply(&x, y_.contiguous(), gate_.contiguous(), index_.contiguous());
}

std::tuple<at::Tensor, at::Tensor> gated_residual_bwd_cuda(const at::Tensor& g_, const at::Tensor& y_,
                                                           const at::Tensor& gate_, const at::Tensor& index_) {
  check_gated_cuda(g_, y_, gate_, index_, "grad_out");
  c10::cuda::CUDAGuard guard(g_.device());
  auto g = g_.contiguous(), y = y_.contiguous(), gate = gate_.contiguous(), index = index_.contiguous();
  auto gy = gated_apply(nullptr, g, gate, index);
  auto dgate = at::zeros(gate.sizes(), gate.options().dtype(stat_dtype(gate)));
  launch_param_grad(false, g, y, nullptr, nullptr, index, dgate, nullptr, gate.size(0));
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
