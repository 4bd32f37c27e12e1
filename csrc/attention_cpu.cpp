// CPU varlen attention (forward + backward): one (segment, head) per task (backward: per kv head), exact
// softmax with the row max subtracted, accumulation in opmath (fp32 for half types, fp64 for fp64).
// GQA by indexing (query head h reads kv head h / (H / H_kv)); q/k/v may be strided row views.
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

#include "checks.h"
#include "elit_common.h"

namespace elit {
namespace {

static KernelRegistrar reg_fwd("varlen_attn_fwd_cpu");
static KernelRegistrar reg_bwd("varlen_attn_bwd_cpu");

// Keys query row i (of lq) sees in a segment of lk keys: [lo, lo + count), flash-attn's semantics with
// diag = i + lk - lq (bottom-right aligned): j <= diag when causal, j >= diag - left when left >= 0,
// j <= diag + right when right >= 0.
struct KeyRange {
  int64_t lo, count;
};
inline KeyRange visible_keys(int64_t i, int64_t lq, int64_t lk, bool causal, int64_t left, int64_t right) {
  const int64_t diag = i + lk - lq;
  int64_t lo = 0, hi = lk - 1;
  if (causal) hi = std::min(hi, diag);
  if (right >= 0) hi = std::min(hi, diag + right);
  if (left >= 0) lo = std::max(lo, diag - left);
  return {lo, std::max<int64_t>(hi - lo + 1, 0)};
}

// A cu_seqlens element as a row index in [0, total]. The entry checks reject such cu_seqlens today; the
// kernels clamp anyway, so that no change to those checks can make them address a row outside the tensors.
inline int64_t clamp_row(int32_t c, int64_t total) { return std::min<int64_t>(std::max<int64_t>(c, 0), total); }

// Row r, head h of a [total, H, D] tensor with unit stride along D (any row / head strides: the views of
// a packed qkv are read in place).
template <typename T>
struct Rows {
  T* p;
  int64_t st, sh;
  explicit Rows(const at::Tensor& t) : p(static_cast<T*>(t.data_ptr())), st(t.stride(0)), sh(t.stride(1)) {}
  T* operator()(int64_t r, int64_t h) const { return p + r * st + h * sh; }
};

// Unit stride along the head dim is all the kernels need; anything else is copied once.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); }

template <typename scalar_t>
void attn_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* cq,
                     const int32_t* ck, int64_t segs, double scale, bool causal, int64_t left, int64_t right,
                     double softcap, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = q.size(1), D = q.size(2), tq = q.size(0), tk = k.size(0), group = H / k.size(1);
  const Rows<const scalar_t> Q(q), K(k), V(v);
  const Rows<scalar_t> O(out);
  acc_t* lp = lse.mutable_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t cap = static_cast<acc_t>(softcap);  // > 0: logits capped as cap * tanh(s / cap)
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  // Rows past the packed data (a longer static buffer) see no key: zeros and lse = +inf, as flash-attn.
  for (int64_t row = clamp_row(cq[segs], tq); row < tq; ++row)
    for (int64_t h = 0; h < H; ++h) {
      std::fill(O(row, h), O(row, h) + D, scalar_t(0));
      lp[h * tq + row] = inf;
    }
  at::parallel_for(0, segs * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s, o(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / H, h = item % H, hk = h / group;  // GQA: query head h reads kv head hk
      const int64_t qs = clamp_row(cq[seg], tq), lq = std::max<int64_t>(clamp_row(cq[seg + 1], tq) - qs, 0);
      const int64_t ks = clamp_row(ck[seg], tk), lk = std::max<int64_t>(clamp_row(ck[seg + 1], tk) - ks, 0);
      s.resize(std::max<int64_t>(lk, 1));
      for (int64_t i = 0; i < lq; ++i) {
        const int64_t row = qs + i;
        const KeyRange kr = visible_keys(i, lq, lk, causal, left, right);
        const int64_t nk = kr.count, k0 = ks + kr.lo;
        scalar_t* orow = O(row, h);
        if (nk == 0) {
          std::fill(orow, orow + D, scalar_t(0));
          lp[h * tq + row] = inf;
          continue;
        }
        const scalar_t* qrow = Q(row, h);
        acc_t m = -inf;
        for (int64_t j = 0; j < nk; ++j) {
          const scalar_t* krow = K(k0 + j, hk);
          acc_t dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += static_cast<acc_t>(qrow[d]) * static_cast<acc_t>(krow[d]);
          s[j] = cap > 0 ? cap * std::tanh(dot * sc / cap) : dot * sc;
          m = std::max(m, s[j]);
        }
        acc_t l = 0;
        std::fill(o.begin(), o.end(), acc_t(0));
        for (int64_t j = 0; j < nk; ++j) {
          const acc_t p = std::exp(s[j] - m);
          l += p;
          const scalar_t* vrow = V(k0 + j, hk);
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
                     double scale, bool causal, int64_t left, int64_t right, double softcap, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = q.size(1), D = q.size(2), tq = q.size(0), tk = k.size(0), Hk = k.size(1), group = H / Hk;
  const Rows<const scalar_t> Q(q), K(k), V(v), O(out), dO(dout);
  const Rows<scalar_t> dQ(dq), dK(dk), dV(dv);
  const acc_t* lp = lse.const_data_ptr<acc_t>();
  const acc_t sc = static_cast<acc_t>(scale);
  const acc_t cap = static_cast<acc_t>(softcap);
  // Rows outside every segment get zero gradients.
  for (int64_t row = clamp_row(cq[segs], tq); row < tq; ++row)
    for (int64_t h = 0; h < H; ++h) std::fill(dQ(row, h), dQ(row, h) + D, scalar_t(0));
  for (int64_t row = clamp_row(ck[segs], tk); row < tk; ++row)
    for (int64_t h = 0; h < Hk; ++h) {
      std::fill(dK(row, h), dK(row, h) + D, scalar_t(0));
      std::fill(dV(row, h), dV(row, h) + D, scalar_t(0));
    }
  // One task per (segment, kv head): it owns that head's dk/dv rows and sums them over the query heads
  // that share it, so no two tasks write the same element (deterministic, no atomics).
  at::parallel_for(0, segs * Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> dkacc, dvacc, dqrow(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seg = item / Hk, hk = item % Hk;
      const int64_t qs = clamp_row(cq[seg], tq), lq = std::max<int64_t>(clamp_row(cq[seg + 1], tq) - qs, 0);
      const int64_t ks = clamp_row(ck[seg], tk), lk = std::max<int64_t>(clamp_row(ck[seg + 1], tk) - ks, 0);
      dkacc.assign(lk * D, acc_t(0));
      dvacc.assign(lk * D, acc_t(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t row = qs + i;
          const KeyRange kr = visible_keys(i, lq, lk, causal, left, right);
          const int64_t nk = kr.count;
          scalar_t* dqout = dQ(row, h);
          if (nk == 0) {
            std::fill(dqout, dqout + D, scalar_t(0));
            continue;
          }
          const scalar_t* qrow = Q(row, h);
          const scalar_t* orow = O(row, h);
          const scalar_t* dorow = dO(row, h);
          const acc_t l = lp[h * tq + row];
          acc_t di = 0;  // rowsum(dout * out): the softmax-Jacobian correction
          for (int64_t d = 0; d < D; ++d) di += static_cast<acc_t>(dorow[d]) * static_cast<acc_t>(orow[d]);
          std::fill(dqrow.begin(), dqrow.end(), acc_t(0));
          for (int64_t j = kr.lo; j < kr.lo + nk; ++j) {
            const scalar_t* krow = K(ks + j, hk);
            const scalar_t* vrow = V(ks + j, hk);
            acc_t dot = 0, dp = 0;
            for (int64_t d = 0; d < D; ++d) {
              dot += static_cast<acc_t>(qrow[d]) * static_cast<acc_t>(krow[d]);
              dp += static_cast<acc_t>(dorow[d]) * static_cast<acc_t>(vrow[d]);
            }
            // A single visible key has p = 1 and ds = 0 exactly (the softmax's own backward), whatever
            // rounding exp and the stored lse carry.
            // With softcap, s = cap * tanh(t) for t = scale q.k / cap, and ds/d(q.k) = scale * (1 - tanh(t)^2).
            const acc_t th = cap > 0 ? std::tanh(dot * sc / cap) : acc_t(0);
            const acc_t s_ij = cap > 0 ? cap * th : dot * sc;
            const acc_t p = nk == 1 ? acc_t(1) : std::exp(s_ij - l);
            const acc_t ds = nk == 1 ? acc_t(0) : p * (dp - di) * sc * (cap > 0 ? acc_t(1) - th * th : acc_t(1));
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
      }
      for (int64_t j = 0; j < lk; ++j) {
        scalar_t* dkrow = dK(ks + j, hk);
        scalar_t* dvrow = dV(ks + j, hk);
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
                                                       int64_t max_k, double scale, bool causal, int64_t window_left,
                                                       int64_t window_right, double softcap) {
  checks::varlen_attn_fwd(q_, k_, v_, cu_q_, cu_k_, max_q, max_k, window_left, window_right, softcap, Kernels::kCpu);
  auto q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  // Contiguous outputs whatever the input strides (the fake impl promises the same).
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({q.size(1), q.size(0)}, q.options().dtype(stat_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attn_fwd_cpu", [&] {
    attn_fwd_kernel<scalar_t>(q, k, v, cu_q.const_data_ptr<int32_t>(), cu_k.const_data_ptr<int32_t>(),
                              cu_q.size(0) - 1, scale, causal, window_left, window_right, softcap, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attn_bwd_cpu(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& cu_q_, const at::Tensor& cu_k_, int64_t max_q, int64_t max_k,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap) {
  checks::varlen_attn_bwd(dout_, q_, k_, v_, out_, lse_, cu_q_, cu_k_, max_q, max_k, window_left, window_right,
                          softcap, Kernels::kCpu);
  auto q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  auto out = last_dim_contiguous(out_), dout = last_dim_contiguous(dout_), lse = lse_.contiguous();
  auto cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  auto dq = new_output(q.sizes(), q.options()), dk = new_output(k.sizes(), k.options());
  auto dv = new_output(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attn_bwd_cpu", [&] {
    attn_bwd_kernel<scalar_t>(dout, q, k, v, out, lse, cu_q.const_data_ptr<int32_t>(),
                              cu_k.const_data_ptr<int32_t>(), cu_q.size(0) - 1, scale, causal, window_left,
                              window_right, softcap, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(elit, CPU, m) {
  m.impl("varlen_attn_fwd", &varlen_attn_fwd_cpu);
  m.impl("varlen_attn_bwd", &varlen_attn_bwd_cpu);
}

}  // namespace elit
