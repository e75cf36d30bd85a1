// The only file of the project that knows Python. It turns the plain integers
// that python/quadmamba/_backend.py sends for each tensor into TensorViews,
// dispatches to the CPU or CUDA entry points of the core, and maps core errors
// to Python exceptions (quadmamba::Error -> ValueError).
//
// A tensor arrives as the tuple (data_ptr, dtype_code, device_index, shape, strides)
// with device_index -1 for CPU and strides in elements; an absent optional tensor
// arrives as None. A CUDA stream arrives as an integer (cudaStream_t value).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "quadmamba/common.h"
#include "quadmamba/cross_scan.h"
#include "quadmamba/parallel.h"
#include "quadmamba/quad_scan.h"
#include "quadmamba/selective_scan.h"
#include "quadmamba/tensor_view.h"

namespace py = pybind11;
using quadmamba::Device;
using quadmamba::DType;
using quadmamba::TensorView;

namespace {

TensorView to_view(const py::handle& obj, const char* name) {
  if (obj.is_none()) return TensorView{};
  auto t = obj.cast<py::tuple>();
  QM_CHECK(t.size() == 5, name, ": expected (ptr, dtype, device, shape, strides)");
  TensorView v;
  v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
  v.dtype = static_cast<DType>(t[1].cast<int>());
  v.device = Device{t[2].cast<int>()};
  auto shape = t[3].cast<py::tuple>();
  auto strides = t[4].cast<py::tuple>();
  QM_CHECK(shape.size() <= TensorView::kMaxDims, name, " has too many dims");
  QM_CHECK(strides.size() == shape.size(), name, ": strides must have one entry per dim, got ", strides.size(),
           " for ", shape.size(), " dims");
  v.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = shape[d].cast<int64_t>();
    v.strides[d] = strides[d].cast<int64_t>();
  }
  return v;
}

void* to_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

quadmamba::QuadGeometry quad_geometry(int64_t H, int64_t W, int64_t sy, int64_t sx, const std::string& order) {
  QM_CHECK(order == "quadtree" || order == "official", "order must be 'quadtree' or 'official', got '",
           order, "'");
  return quadmamba::make_quad_geometry(H, W, sy, sx,
                                       order == "quadtree" ? quadmamba::QuadOrder::Quadtree
                                                           : quadmamba::QuadOrder::Official);
}

// Raised for a CUDA tensor when the CUDA kernels were not compiled in.
[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(
      std::string(op) +
      ": got CUDA tensors, but this quadmamba build has no CUDA kernels. Rebuild with the "
      "CUDA toolkit on PATH: pip install --no-build-isolation -C cmake.define.QUADMAMBA_CUDA=ON .");
}

}  // namespace

// The CUDA branch of an entry point: `call` in CUDA builds; in CPU-only builds the
// no-CUDA error (the CUDA functions are not compiled there, so `call` must vanish).
#if defined(QUADMAMBA_WITH_CUDA)
#define QM_CUDA_OR_ERROR(op, call) call
#else
#define QM_CUDA_OR_ERROR(op, call) ((void)stream, no_cuda(op))
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "quadmamba core kernels (CPU and, when built, CUDA)";
  py::register_exception<quadmamba::Error>(m, "KernelError", PyExc_ValueError);

  m.def("cuda_built", [] { return quadmamba::cuda_built(); },
        "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_status", [] {
    const quadmamba::CudaStatus s = quadmamba::cuda_status();
    py::dict d;
    d["runtime_version"] = s.runtime_version;
    d["driver_version"] = s.driver_version;
    d["device_count"] = s.device_count;
    d["error"] = s.error;
    return d;
  }, "What the linked CUDA runtime finds: runtime_version and driver_version (1000 * major + 10 * minor; "
     "0: CPU-only build / no driver), device_count (usable devices), error (the runtime's message, or '').");
  m.def("cpu_isa", [] {
    py::dict d;
    d["selective_scan"] = quadmamba::selective_scan_cpu_isa();
    d["quad_scan"] = quadmamba::quad_scan_cpu_isa();
    return d;
  }, "The instruction set each family of CPU kernels runs with here (e.g. avx2, avx, sse2, portable).");
  m.def("num_threads", [] { return quadmamba::num_threads(); },
        "Threads the CPU kernels use (shared with PyTorch's OpenMP pool).");
  m.def("openmp", [] {
#if defined(QUADMAMBA_WITH_OPENMP)
    return true;
#else
    return false;
#endif
  }, "Whether the CPU kernels run on the OpenMP runtime (else on their own std::thread workers).");
  m.def("set_num_threads", [](int n) { quadmamba::set_num_threads(n); }, py::arg("n"),
        "Worker count of builds without OpenMP (<= 0: one per hardware thread); OpenMP builds ignore it.");

  // ---- ops are bound below, one block per op --------------------------------

  // quad_scan / quad_merge (quad_scan.h). Geometry arguments: H, W, sy, sx, order.
  m.def("quad_scan_fwd", [](py::object x, py::object decision, py::object out, int64_t H, int64_t W,
                            int64_t sy, int64_t sx, const std::string& order, uintptr_t stream) {
    const auto g = quad_geometry(H, W, sy, sx, order);
    const TensorView xv = to_view(x, "x"), dv = to_view(decision, "decision"), ov = to_view(out, "out");
    py::gil_scoped_release release;
    if (xv.device.is_cpu()) return quadmamba::quad_scan_fwd_cpu(xv, dv, ov, g);
    QM_CUDA_OR_ERROR("quad_scan_fwd", quadmamba::quad_scan_fwd_cuda(xv, dv, ov, g, to_stream(stream)));
  });
  m.def("quad_scan_bwd", [](py::object x, py::object decision, py::object gout, py::object dx,
                            py::object ddecision, py::object workspace, int64_t H, int64_t W, int64_t sy,
                            int64_t sx, const std::string& order, uintptr_t stream) {
    const auto g = quad_geometry(H, W, sy, sx, order);
    const TensorView xv = to_view(x, "x"), dv = to_view(decision, "decision"), gv = to_view(gout, "gout"),
                     dxv = to_view(dx, "dx"), ddv = to_view(ddecision, "ddecision"),
                     wv = to_view(workspace, "workspace");
    py::gil_scoped_release release;
    if (xv.device.is_cpu()) return quadmamba::quad_scan_bwd_cpu(xv, dv, gv, dxv, ddv, wv, g);
    QM_CUDA_OR_ERROR("quad_scan_bwd", quadmamba::quad_scan_bwd_cuda(xv, dv, gv, dxv, ddv, wv, g, to_stream(stream)));
  });
  m.def("quad_merge_fwd", [](py::object ys, py::object decision, py::object y, int64_t H, int64_t W,
                             int64_t sy, int64_t sx, const std::string& order, uintptr_t stream) {
    const auto g = quad_geometry(H, W, sy, sx, order);
    const TensorView sv = to_view(ys, "ys"), dv = to_view(decision, "decision"), yv = to_view(y, "y");
    py::gil_scoped_release release;
    if (sv.device.is_cpu()) return quadmamba::quad_merge_fwd_cpu(sv, dv, yv, g);
    QM_CUDA_OR_ERROR("quad_merge_fwd", quadmamba::quad_merge_fwd_cuda(sv, dv, yv, g, to_stream(stream)));
  });
  m.def("quad_merge_bwd", [](py::object ys, py::object decision, py::object gy, py::object dys,
                             py::object ddecision, py::object workspace, int64_t H, int64_t W, int64_t sy,
                             int64_t sx, const std::string& order, uintptr_t stream) {
    const auto g = quad_geometry(H, W, sy, sx, order);
    const TensorView sv = to_view(ys, "ys"), dv = to_view(decision, "decision"), gv = to_view(gy, "gy"),
                     dsv = to_view(dys, "dys"), ddv = to_view(ddecision, "ddecision"),
                     wv = to_view(workspace, "workspace");
    py::gil_scoped_release release;
    if (sv.device.is_cpu()) return quadmamba::quad_merge_bwd_cpu(sv, dv, gv, dsv, ddv, wv, g);
    QM_CUDA_OR_ERROR("quad_merge_bwd", quadmamba::quad_merge_bwd_cuda(sv, dv, gv, dsv, ddv, wv, g, to_stream(stream)));
  });

  // cross_scan / cross_merge (cross_scan.h): each is the other's backward.
  m.def("cross_scan_fwd", [](py::object x, py::object out, uintptr_t stream) {
    const TensorView xv = to_view(x, "x"), ov = to_view(out, "out");
    py::gil_scoped_release release;
    if (xv.device.is_cpu()) return quadmamba::cross_scan_fwd_cpu(xv, ov);
    QM_CUDA_OR_ERROR("cross_scan_fwd", quadmamba::cross_scan_fwd_cuda(xv, ov, to_stream(stream)));
  });
  m.def("cross_merge_fwd", [](py::object ys, py::object y, uintptr_t stream) {
    const TensorView sv = to_view(ys, "ys"), yv = to_view(y, "y");
    py::gil_scoped_release release;
    if (sv.device.is_cpu()) return quadmamba::cross_merge_fwd_cpu(sv, yv);
    QM_CUDA_OR_ERROR("cross_merge_fwd", quadmamba::cross_merge_fwd_cuda(sv, yv, to_stream(stream)));
  });

  // selective_scan: see cpp/include/quadmamba/selective_scan.h for the contract.
  m.def("selective_scan_chunk_cuda", [] {
#if defined(QUADMAMBA_WITH_CUDA)
    return quadmamba::selective_scan_chunk_cuda();
#else
    return int64_t{0};
#endif
  }, "Chunk length of the CUDA kernels (sizes the backward's workspace); 0 without CUDA.");
  m.def(
      "selective_scan_fwd",
      [](py::object u, py::object delta, py::object A, py::object B, py::object C, py::object D,
         py::object delta_bias, bool delta_softplus, py::object y, uintptr_t stream, py::object delta_proj) {
        const TensorView vu = to_view(u, "u"), vdelta = to_view(delta, "delta"),
                         vA = to_view(A, "A"), vB = to_view(B, "B"), vC = to_view(C, "C"),
                         vD = to_view(D, "D"), vbias = to_view(delta_bias, "delta_bias"),
                         vy = to_view(y, "y"), vproj = to_view(delta_proj, "delta_proj");
        auto p = quadmamba::selective_scan_params(vu, vdelta, vA, vB, vC, vD, vbias, delta_softplus, vproj);
        p.stream = to_stream(stream);
        py::gil_scoped_release release;
        if (vu.device.is_cpu())
          return quadmamba::selective_scan_fwd_cpu(p, vu, vdelta, vA, vB, vC, vD, vbias, vy, vproj);
        QM_CUDA_OR_ERROR("selective_scan_fwd",
                         quadmamba::selective_scan_fwd_cuda(p, vu, vdelta, vA, vB, vC, vD, vbias, vy));
      },
      py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
      py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("y"), py::arg("stream"),
      py::arg("delta_proj") = py::none(),
      "Selective scan forward: writes y. With delta_proj (KD, R) (CPU), delta is the low-rank (B, K, R, L).");
  m.def(
      "selective_scan_bwd",
      [](py::object u, py::object delta, py::object A, py::object B, py::object C, py::object D,
         py::object delta_bias, bool delta_softplus, py::object dy, py::object du,
         py::object ddelta, py::object dA, py::object dB, py::object dC, py::object dD,
         py::object ddelta_bias, py::object workspace, py::object partials, py::object row_partials,
         uintptr_t stream, py::object delta_proj) {
        const TensorView vu = to_view(u, "u"), vdelta = to_view(delta, "delta"),
                         vA = to_view(A, "A"), vB = to_view(B, "B"), vC = to_view(C, "C"),
                         vD = to_view(D, "D"), vbias = to_view(delta_bias, "delta_bias"),
                         vdy = to_view(dy, "dy"), vdu = to_view(du, "du"),
                         vddelta = to_view(ddelta, "ddelta"), vdA = to_view(dA, "dA"),
                         vdB = to_view(dB, "dB"), vdC = to_view(dC, "dC"), vdD = to_view(dD, "dD"),
                         vdbias = to_view(ddelta_bias, "ddelta_bias"), vproj = to_view(delta_proj, "delta_proj");
        [[maybe_unused]] const TensorView vws = to_view(workspace, "workspace"),  // CUDA only
                                          vpart = to_view(partials, "partials"),
                                          vrow = to_view(row_partials, "row_partials");
        auto p = quadmamba::selective_scan_params(vu, vdelta, vA, vB, vC, vD, vbias, delta_softplus, vproj);
        p.stream = to_stream(stream);
        py::gil_scoped_release release;
        if (vu.device.is_cpu())
          return quadmamba::selective_scan_bwd_cpu(p, vu, vdelta, vA, vB, vC, vD, vbias, vdy, vdu, vddelta,
                                                   vdA, vdB, vdC, vdD, vdbias, vproj);
        QM_CUDA_OR_ERROR("selective_scan_bwd",
                         quadmamba::selective_scan_bwd_cuda(p, vu, vdelta, vA, vB, vC, vD, vbias, vdy, vdu,
                                                            vddelta, vdA, vdB, vdC, vdD, vdbias, vws, vpart,
                                                            vrow));
      },
      py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
      py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("dy"), py::arg("du"),
      py::arg("ddelta"), py::arg("dA"), py::arg("dB"), py::arg("dC"), py::arg("dD"),
      py::arg("ddelta_bias"), py::arg("workspace"), py::arg("partials"), py::arg("row_partials"),
      py::arg("stream"), py::arg("delta_proj") = py::none(),
      "Selective scan backward: writes du, ddelta, dA, dB, dC, dD, ddelta_bias (ddelta: the gradient of the "
      "projected (B, KD, L) delta where delta_proj is given; CUDA: the "
      "float32 dA, dB, dC, dD, ddelta_bias buffers must be zeroed by the caller unless the "
      "partials buffers are given, which selects the deterministic reduction).");
}
