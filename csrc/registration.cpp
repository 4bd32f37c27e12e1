// elit_kernels._C: the `elit::` op schemas and the pybind11 build-info helpers.
//
// Schemas live here once; each backend file adds its kernels with TORCH_LIBRARY_IMPL. Fake
// (meta) kernels and autograd formulas are registered from Python (elit_kernels/_cext.py), which
// set_python_module makes torch import whenever it needs them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>
#include <torch/python.h>  // at::Tensor <-> torch.Tensor for the checks submodule

#include <stdexcept>

#include "checks.h"
#include "elit_common.h"

#define ELIT_STR_(x) #x
#define ELIT_STR(x) ELIT_STR_(x)

namespace elit {

std::vector<std::string>& compiled_kernels() {
  static std::vector<std::string> names;
  return names;
}

#ifdef ELIT_WITH_CUDA
// Defined in cuda/build_info.cu (the nvcc host pass knows the target archs and the runtime version).
std::vector<int> cuda_archs();
int cuda_runtime_version();
#endif

}  // namespace elit

TORCH_LIBRARY(elit, m) {
  m.set_python_module("elit_kernels._cext");
  // Varlen attention. q [total_q, H, D], k/v [total_k, H_kv, D] with H % H_kv == 0; out and lse are
  // contiguous. lse is [H, total_q], fp32 (fp64 for fp64 inputs), +inf (as flash-attn) for rows that see
  // no key, rows past cu_seqlens_q[-1] included (their out rows are zeros).
  // window_left/right: sliding window as flash-attn (-1: unbounded side); softcap > 0 caps the logits as
  // softcap * tanh(s / softcap) (0: off). The CUDA kernels implement neither and refuse them.
  // The lengths are SymInt so that torch.compile(dynamic=True) keeps them symbolic (an int would specialise
  // the graph on each new max_seqlen); the kernels still take int64_t.
  m.def("varlen_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal, SymInt window_left=-1, "
        "SymInt window_right=-1, float softcap=0.0) -> (Tensor out, Tensor lse)");
  m.def("varlen_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale, bool causal, "
        "SymInt window_left=-1, SymInt window_right=-1, float softcap=0.0) -> (Tensor dq, Tensor dk, Tensor dv)");
  // LayerNorm (no affine) + adaLN modulate; mean/rstd are [T] fp32 (fp64 for fp64 x), kept for backward.
  m.def("layernorm_modulate_fwd(Tensor x, Tensor shift, Tensor scale, Tensor index, float eps) "
        "-> (Tensor out, Tensor mean, Tensor rstd)");
  m.def("layernorm_modulate_bwd(Tensor grad_out, Tensor x, Tensor scale, Tensor index, Tensor mean, Tensor rstd) "
        "-> (Tensor grad_x, Tensor grad_shift, Tensor grad_scale)");
  // x + gate[index] * y; the x gradient is grad_out itself, so the backward returns (dy, dgate).
  m.def("gated_residual_fwd(Tensor x, Tensor y, Tensor gate, Tensor index) -> Tensor");
  m.def("gated_residual_bwd(Tensor grad_out, Tensor y, Tensor gate, Tensor index) -> (Tensor grad_y, Tensor grad_gate)");
}

namespace py = pybind11;

namespace {

// A failed check as a RuntimeError carrying the check's message alone (no C++ backtrace).
template <typename F>
void run_check(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.msg());
  }
}

inline elit::Kernels kernels(bool cuda) { return cuda ? elit::Kernels::kCuda : elit::Kernels::kCpu; }

// _C.checks.<op>(<the op's arguments>, cuda=...): the argument checks of the op's CUDA (cuda=True) or CPU
// entry point, without running it, on tensors of any device (cuda=True skips only the "is a CUDA tensor"
// check). Returns None or raises the RuntimeError the op would raise.
void def_checks(py::module_& m) {
  auto c = m.def_submodule(
      "checks", "The argument checks of each elit:: op's CPU or CUDA entry point (cuda=...), run without the op.");
  using at::Tensor;
  c.def("varlen_attn_fwd",
        [](const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k, int64_t max_q,
           int64_t max_k, double, bool, int64_t wl, int64_t wr, double softcap, bool cuda) {
          run_check([&] { elit::checks::varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, wl, wr, softcap,
                                                         kernels(cuda)); });
        },
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("softmax_scale"), py::arg("causal"),
        py::arg("window_left") = -1, py::arg("window_right") = -1, py::arg("softcap") = 0.0, py::kw_only(),
        py::arg("cuda"));
  c.def("varlen_attn_bwd",
        [](const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
           const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k, double, bool, int64_t wl, int64_t wr,
           double softcap, bool cuda) {
          run_check([&] { elit::checks::varlen_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, wl, wr,
                                                         softcap, kernels(cuda)); });
        },
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("window_left") = -1, py::arg("window_right") = -1,
        py::arg("softcap") = 0.0, py::kw_only(), py::arg("cuda"));
  c.def("layernorm_modulate_fwd",
        [](const Tensor& x, const Tensor& shift, const Tensor& scale, const Tensor& index, double eps, bool cuda) {
          run_check([&] { elit::checks::layernorm_modulate_fwd(x, shift, scale, index, eps, kernels(cuda)); });
        },
        py::arg("x"), py::arg("shift"), py::arg("scale"), py::arg("index"), py::arg("eps"), py::kw_only(),
        py::arg("cuda"));
  c.def("layernorm_modulate_bwd",
        [](const Tensor& g, const Tensor& x, const Tensor& scale, const Tensor& index, const Tensor& mean,
           const Tensor& rstd, bool cuda) {
          run_check([&] { elit::checks::layernorm_modulate_bwd(g, x, scale, index, mean, rstd, kernels(cuda)); });
        },
        py::arg("grad_out"), py::arg("x"), py::arg("scale"), py::arg("index"), py::arg("mean"), py::arg("rstd"),
        py::kw_only(), py::arg("cuda"));
  c.def("gated_residual_fwd",
        [](const Tensor& x, const Tensor& y, const Tensor& gate, const Tensor& index, bool cuda) {
          run_check([&] { elit::checks::gated_residual_fwd(x, y, gate, index, kernels(cuda)); });
        },
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("index"), py::kw_only(), py::arg("cuda"));
  c.def("gated_residual_bwd",
        [](const Tensor& g, const Tensor& y, const Tensor& gate, const Tensor& index, bool cuda) {
          run_check([&] { elit::checks::gated_residual_bwd(g, y, gate, index, kernels(cuda)); });
        },
        py::arg("grad_out"), py::arg("y"), py::arg("gate"), py::arg("index"), py::kw_only(), py::arg("cuda"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "elit-kernels compiled ops (registered under torch.ops.elit) and build information";
  m.def("build_info", []() {
    py::dict d;
#ifdef ELIT_BUILD_TORCH_VERSION
    d["torch_version"] = std::string(ELIT_STR(ELIT_BUILD_TORCH_VERSION));
#else
    d["torch_version"] = std::string("unknown");
#endif
#ifdef ELIT_WITH_CUDA
    d["with_cuda"] = true;
    d["cuda_archs"] = elit::cuda_archs();
    int v = elit::cuda_runtime_version();
    d["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
#else
    d["with_cuda"] = false;
    d["cuda_archs"] = std::vector<int>{};
    d["cuda_version"] = py::none();
#endif
    d["kernels"] = elit::compiled_kernels();
    return d;
  }, "Dict: torch_version (built against), with_cuda, cuda_archs (e.g. [80, 90]), cuda_version, kernels.");
  m.def("set_poison_outputs", [](bool on) { elit::poison_outputs().store(on); }, py::arg("enabled"),
        "NaN-fill every output an op writes in full before it runs (elit_kernels._outputs hands its switch over).");
  m.def("poison_outputs_enabled", []() { return elit::poison_outputs().load(); },
        "Whether the ops' outputs are NaN-filled before they run.");
  def_checks(m);
}
