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
#include "quadmamba/parallel.h"
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
  v.ndim = static_cast<int>(shape.size());
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = shape[d].cast<int64_t>();
    v.strides[d] = strides[d].cast<int64_t>();
  }
  return v;
}

void* to_stream(uintptr_t stream) { return reinterpret_cast<void*>(stream); }

// Raised for a CUDA tensor when the CUDA kernels were not compiled in.
[[noreturn]] void no_cuda(const char* op) {
  throw std::runtime_error(
      std::string(op) +
      ": got CUDA tensors, but this quadmamba build has no CUDA kernels. Rebuild with the "
      "CUDA toolkit on PATH: pip install --no-build-isolation -C cmake.define.QUADMAMBA_CUDA=ON .");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "quadmamba core kernels (CPU and, when built, CUDA)";
  py::register_exception<quadmamba::Error>(m, "KernelError", PyExc_ValueError);

  m.def("cuda_built", [] { return quadmamba::cuda_built(); },
        "Whether the CUDA kernels were compiled into this build.");
  m.def("cuda_device_count", [] { return quadmamba::cuda_device_count(); },
        "Number of usable CUDA devices (0 without a build, driver or device).");
  m.def("num_threads", [] { return quadmamba::num_threads(); },
        "Threads the CPU kernels use (shared with PyTorch's OpenMP pool).");

  (void)&to_view;
  (void)&to_stream;
  (void)&no_cuda;

  // ---- ops are bound below, one block per op --------------------------------
}
