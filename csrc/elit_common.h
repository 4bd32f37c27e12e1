// Shared argument checks and the compiled-kernel registry of elit_kernels._C.
//
// Every check names the offending argument first ("q: ...") so a TORCH_CHECK failure points at it.
// CPU and CUDA implementations share the shape/dtype/device checks; only the CPU side reads
// cu_seqlens/index values (a device read on CUDA would be a host sync). The entry points call them
// through checks.h (one function per op, with the CUDA kernels' own limits).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <limits>
#include <string>
#include <vector>

namespace elit {

// The poison switch (elit_kernels/_outputs.py, ELIT_POISON_OUTPUTS): Python hands it over through
// _C.set_poison_outputs. When on, every output an op is meant to write in full starts as NaN instead of
// leftover memory, so an element a kernel forgets to write fails the tests. One flag for the whole extension
// (an inline function's static is one object across translation units).
inline std::atomic<bool>& poison_outputs() {
  static std::atomic<bool> on{false};
  return on;
}

// An output buffer for a kernel to write in full: at::empty, NaN-filled when the poison switch is on.
// Buffers a kernel accumulates into start from at::zeros instead.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
  if (poison_outputs().load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// new_output with like's shape, dtype, device and strides (at::empty_like).
inline at::Tensor new_output_like(const at::Tensor& like) {
  auto t = at::empty_like(like);
  if (poison_outputs().load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Names of the kernels compiled into this build (filled by static registrars in each source).
std::vector<std::string>& compiled_kernels();

struct KernelRegistrar {
  explicit KernelRegistrar(const char* name) { compiled_kernels().emplace_back(name); }
};

inline void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined one");
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(), "-D shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": on device ", t.device(), ", but ", ref_name, " is on ",
              ref.device());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": dtype ", t.scalar_type(), " does not match ",
              ref_name, "'s dtype ", ref.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, name,
              ": dtype ", st, " not supported; expected float16, bfloat16, float32 or float64");
}

// Shapes, dtypes and devices of varlen attention arguments (all devices).
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_tensor(q, "q", 3);
  check_tensor(k, "k", 3);
  check_tensor(v, "v", 3);
  check_floating(q, "q");
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  // GQA / MQA: k and v share H_kv heads, which must divide q's H (query head h reads kv head h / (H / H_kv)).
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "k: has ", k.size(1),
              " heads, which does not divide q's ", q.size(1), " heads (num_heads % num_kv_heads must be 0)");
  TORCH_CHECK(v.size(1) == k.size(1), "v: has ", v.size(1), " heads, k has ", k.size(1));
  TORCH_CHECK(k.size(2) == q.size(2), "k: head dim ", k.size(2), " does not match q's head dim ", q.size(2));
  TORCH_CHECK(v.size(2) == q.size(2), "v: head dim ", v.size(2), " does not match q's head dim ", q.size(2));
  TORCH_CHECK(v.size(0) == k.size(0), "v: has ", v.size(0), " tokens, k has ", k.size(0));
  TORCH_CHECK(q.size(2) >= 1, "q: head dim must be >= 1");
  for (auto [cu, name] : {std::pair<const at::Tensor&, const char*>{cu_q, "cu_seqlens_q"}, {cu_k, "cu_seqlens_k"}}) {
    check_tensor(cu, name, 1);
    TORCH_CHECK(cu.scalar_type() == at::kInt, name, ": expected dtype int32, got ", cu.scalar_type());
    TORCH_CHECK(cu.size(0) >= 1, name, ": expected at least one element (cu[0] = 0)");
    check_same_device(cu, name, q, "q");
  }
  TORCH_CHECK(cu_k.size(0) == cu_q.size(0), "cu_seqlens_k: has ", cu_k.size(0), " elements but cu_seqlens_q has ",
              cu_q.size(0));
  TORCH_CHECK(max_q >= 0, "max_seqlen_q: must be >= 0, got ", max_q);
  TORCH_CHECK(max_k >= 0, "max_seqlen_k: must be >= 0, got ", max_k);
}

// Sliding window and soft-capping options of varlen attention (flash-attn semantics).
inline void check_mask_args(int64_t window_left, int64_t window_right, double softcap) {
  TORCH_CHECK(window_left >= -1, "window_size: left must be >= -1 (-1: unbounded), got ", window_left);
  TORCH_CHECK(window_right >= -1, "window_size: right must be >= -1 (-1: unbounded), got ", window_right);
  TORCH_CHECK(softcap >= 0.0, "softcap: must be >= 0 (0: off), got ", softcap);
}

// Values of a CPU cu_seqlens tensor (contiguous int32).
inline void check_cu_values_cpu(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                                const char* max_name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK(c[0] == 0, name, ": must start at 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(c[i] >= c[i - 1], name, ": must be non-decreasing, but ", name, "[", i, "] = ", c[i], " < ", name,
                "[", i - 1, "] = ", c[i - 1]);
    longest = std::max<int64_t>(longest, c[i] - c[i - 1]);
  }
  // Rows past c[n - 1] are allowed (a static buffer longer than the packed data): they belong to no segment.
  TORCH_CHECK(c[n - 1] <= total, name, ": last element ", c[n - 1], " is past the end of the ", total,
              " packed rows; it must be <= the row count");
  TORCH_CHECK(longest <= max_len, max_name, ": ", max_len, " is smaller than the longest segment (", longest,
              ") in ", name);
}

// x [T, C] (named xname) with a per-sample parameter p [B, C] gathered through index [T] (int64).
inline void check_param(const at::Tensor& p, const char* name, const at::Tensor& x, const char* xname = "x") {
  check_tensor(p, name, 2);
  check_same_dtype(p, name, x, xname);
  check_same_device(p, name, x, xname);
  TORCH_CHECK(p.size(1) == x.size(1), name, ": has ", p.size(1), " channels, ", xname, " has ", x.size(1));
}

inline void check_index(const at::Tensor& index, const at::Tensor& x, const char* xname = "x") {
  check_tensor(index, "index", 1);
  TORCH_CHECK(index.scalar_type() == at::kLong, "index: expected dtype int64, got ", index.scalar_type());
  check_same_device(index, "index", x, xname);
  TORCH_CHECK(index.size(0) == x.size(0), "index: has ", index.size(0), " entries, ", xname, " has ", x.size(0),
              " tokens");
}

inline void check_index_values_cpu(const at::Tensor& index, int64_t bound, const char* name, const char* what) {
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, name, ": entry ", i, " = ", p[i], " is out of range [0, ", bound, ") (",
                what, ")");
  }
}

// Dtype of the fp32 (fp64 for fp64 input) statistics the ops save for backward: LSE, mean, rstd.
inline at::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The saved-for-backward tensors of varlen attention, shared by the CPU and CUDA backward wrappers.
inline void check_attention_bwd_extras(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& q) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout: expected shape ", q.sizes(), " (q's), got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "out: expected shape ", q.sizes(), " (q's), got ", out.sizes());
  check_same_dtype(dout, "dout", q, "q");
  check_same_dtype(out, "out", q, "q");
  check_same_device(dout, "dout", q, "q");
  check_same_device(out, "out", q, "q");
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), "lse: expected shape [",
              q.size(1), ", ", q.size(0), "] ([H, total_q]), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == stat_dtype(q), "lse: expected dtype ", stat_dtype(q), ", got ", lse.scalar_type());
  check_same_device(lse, "lse", q, "q");
}

// Arguments of layernorm_modulate's backward (grad_out, x, scale, index, mean, rstd), CPU and CUDA alike.
inline void check_layernorm_modulate_bwd_args(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                              const at::Tensor& index, const at::Tensor& mean,
                                              const at::Tensor& rstd) {
  check_tensor(x, "x", 2);
  check_floating(x, "x");
  TORCH_CHECK(g.sizes() == x.sizes(), "grad_out: expected shape ", x.sizes(), " (x's), got ", g.sizes());
  check_same_dtype(g, "grad_out", x, "x");
  check_same_device(g, "grad_out", x, "x");
  check_param(scale, "scale", x);
  check_index(index, x);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{mean, "mean"}, {rstd, "rstd"}}) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0), name, ": expected shape [", x.size(0), "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == stat_dtype(x), name, ": expected dtype ", stat_dtype(x), ", got ",
                t.scalar_type());
    check_same_device(t, name, x, "x");
  }
}

// Arguments of layernorm_modulate's forward, CPU and CUDA alike.
inline void check_layernorm_modulate_fwd_args(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                                              const at::Tensor& index, double eps) {
  check_tensor(x, "x", 2);
  check_floating(x, "x");
  check_param(shift, "shift", x);
  check_param(scale, "scale", x);
  TORCH_CHECK(scale.size(0) == shift.size(0), "scale: has ", scale.size(0), " samples, shift has ", shift.size(0));
  check_index(index, x);
  TORCH_CHECK(eps >= 0, "eps: must be >= 0, got ", eps);
}

// Arguments of gated_residual (x is grad_out in the backward), CPU and CUDA alike.
inline void check_gated_args(const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& index,
                             const char* xname) {
  check_tensor(x, xname, 2);
  check_floating(x, xname);
  TORCH_CHECK(y.sizes() == x.sizes(), "y: expected shape ", x.sizes(), " (", xname, "'s), got ", y.sizes());
  check_same_dtype(y, "y", x, xname);
  check_same_device(y, "y", x, xname);
  check_param(gate, "gate", x, xname);
  check_index(index, x, xname);
}


}  // namespace elit
