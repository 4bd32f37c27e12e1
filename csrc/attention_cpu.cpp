// CPU varlen attention (forward + backward): one (segment, head) per task, exact softmax with the
// row max subtracted, accumulation in opmath (fp32 for half types, fp64 for fp64).
//
// Not fast; it exists so the op, its schema, autograd and fake impls are exercised on machines
// without a GPU, and as a second, independent C++ check of the reference semantics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "elit_common.h"

namespace elit {
namespace {

static KernelRegistrar reg_fwd("varlen_attn_fwd_cpu");
static KernelRegistrar reg_bwd("varlen_attn_bwd_cpu");

// Number of keys query row i (of lq) may see in a segment of lk keys: all, or bottom-right causal.
inline int64_t visible_keys(int64_t i, int64_t lq, int64_t lk, bool causal) {
  if (!causal) return lk;
  return std::clamp<int64_t>(i + lk - lq + 1, 0, lk);
}

template <typename scalar_t>
void attn_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* cq,
                     const int32_t* ck, int64_t segs, double scale, bool causal, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = q.size(1), D = q.size(2), tq = q.size(0);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  acc_t* lp = lse.mutable_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, segs * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s, o(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / H, h = item % H;
      const int64_t qs = cq[seg], lq = cq[seg + 1] - qs, ks = ck[seg], lk = ck[seg + 1] - ks;
      s.resize(std::max<int64_t>(lk, 1));
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t row = qs + i, nk = visible_keys(i, lq, lk, causal);
        scalar_t* orow = op + (row * H + h) * D;
        if (nk == 0) {
          std::fill(orow, orow + D, scalar_t(0));
          lp[h * tq + row] = -std::numeric_limits<acc_t>::infinity();
          continue;
        }
        const scalar_t* qrow = qp + (row * H + h) * D;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < nk; ++j) {
          const scalar_t* krow = kp + ((ks + j) * H + h) * D;
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(qrow[d]) * static_cast<acc_t>(krow[d]);
          s[j] = dot * sc;
          m = std::max(m, s[j]);
        }
        acc_t l = 0;
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < nk; ++j) {
          const acc_t p = std::exp(s[j] - m);
          l += p;
          const scalar_t* vrow = vp + ((ks + j) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) o[d] += p * static_cast<acc_t>(vrow[d]);
        }
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(o[d] / l);
        lp[h * tq + row] = m + std::log(l);
      }
    }
  });
}

template <typename scalar_t>
void attn_bwd_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const int32_t* cq, const int32_t* ck, int64_t segs,
                     double scale, bool causal, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = q.size(1), D = q.size(2), tq = q.size(0);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* op = out.const_data_ptr<scalar_t>();
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  scalar_t* dqp = dq.mutable_data_ptr<scalar_t>();
  scalar_t* dkp = dk.mutable_data_ptr<scalar_t>();
  scalar_t* dvp = dv.mutable_data_ptr<scalar_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, segs * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dkacc, dvacc, dqrow(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / H, h = item % H;
      const int64_t qs = cq[seg], lq = cq[seg + 1] - qs, ks = ck[seg], lk = ck[seg + 1] - ks;
      dkacc.assign(lk * D, acc_t(0));
      dvacc.assign(lk * D, acc_t(0));
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t row = qs + i, nk = visible_keys(i, lq, lk, causal);
        scalar_t* dqout = dqp + (row * H + h) * D;
        if (nk == 0) {
          std::fill(dqout, dqout + D, scalar_t(0));
          continue;
        }
        const scalar_t* qrow = qp + (row * H + h) * D;
        const scalar_t* orow = op + (row * H + h) * D;
        const scalar_t* dorow = dop + (row * H + h) * D;
        const acc_t l = lp[h * tq + row];
        acc_t di = 0;  // rowsum(dout * out): the softmax-Jacobian correction
        for (int64_t d = 0; d < D; ++d) di += static_cast<acc_t>(dorow[d]) * static_cast<acc_t>(orow[d]);
        std::fill(dqrow.begin(), dqrow.end(), acc_t(0));
        for (int64_t j = 0; j < nk; ++j) {
          const scalar_t* krow = kp + ((ks + j) * H + h) * D;
          const scalar_t* vrow = vp + ((ks + j) * H + h) * D;
          acc_t dot = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) {
            dot += static_cast<acc_t>(qrow[d]) * static_cast<acc_t>(krow[d]);
            dp += static_cast<acc_t>(dorow[d]) * static_cast<acc_t>(vrow[d]);
          }
          const acc_t p = std::exp(dot * sc - l);
          const acc_t ds = p * (dp - di) * sc;
          acc_t* dkj = dkacc.data() + j * D;
          acc_t* dvj = dvacc.data() + j * D;
          for (int64_t d = 0; d < D; ++d) {
            dqrow[d] += ds * static_cast<acc_t>(krow[d]);
            dkj[d] += ds * static_cast<acc_t>(qrow[d]);
            dvj[d] += p * static_cast<acc_t>(dorow[d]);
          }
        }
        for (int64_t d = 0; d < D; ++d) dqout[d] = static_cast<scalar_t>(dqrow[d]);
      }
      for (int64_t j = 0; j < lk; ++j) {
        scalar_t* dkrow = dkp + ((ks + j) * H + h) * D;
        scalar_t* dvrow = dvp + ((ks + j) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          dkrow[d] = static_cast<scalar_t>(dkacc[j * D + d]);
          dvrow[d] = static_cast<scalar_t>(dvacc[j * D + d]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attn_fwd_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                       const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q,
                                                       int64_t max_k, double scale, bool causal) {
  check_attention_args(q_, k_, v_, cu_q_, cu_k_, max_q, max_k);
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  check_cu_values_cpu(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  check_cu_values_cpu(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(stat_dtype(q)));
  // Tokens outside every segment cannot exist (cu ends at the total), so every row is written.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attn_fwd_cpu", [&] {
    attn_fwd_kernel<scalar_t>(q, k, v, cu_q.const_data_ptr<int32_t>(), cu_k.const_data_ptr<int32_t>(),
                              cu_q.size(0) - 1, scale, causal, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
    double scale, bool causal) {
  check_attention_args(q_, k_, v_, cu_q_, cu_k_, max_q, max_k);
  check_attention_bwd_extras(dout_, out_, lse_, q_);
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), out = out_.contiguous();
  auto dout = dout_.contiguous(), lse = lse_.contiguous();
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  check_cu_values_cpu(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  check_cu_values_cpu(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attn_bwd_cpu", [&] {
    attn_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, cu_q.const_data_ptr<int32_t>(),
                              cu_k.const_data_ptr<int32_t>(), cu_q.size(0) - 1, scale, causal, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CPU, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cpu);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cpu);
}

}  // namespace elit
