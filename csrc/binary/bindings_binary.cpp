// pybind11 entry points of the binary family (kept out of csrc/bindings.cpp,
// which only calls register_binary): pointers, sizes and strides in; Python
// (pyaccel/ops_binary.py) validates shapes, dtypes and devices first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "binary/binary.h"

namespace py = pybind11;

namespace pyaccel {
namespace binary {

py::dict kernel_params_binary() {
  const Kernel& k = select_kernel();
  py::dict e;
  e["name"] = k.name;
  e["mr"] = k.mr;
  e["nr"] = kNR;
  e["kr"] = 64;  // bits per word
  e["row_path_rows"] = 0;
  e["stream_min_bytes"] = kStreamMinBytes;  // float outputs from this size on: non-temporal stores
  return e;
}

void register_binary(py::module_& m) {
  m.def("binary_kernel_name", [] { return std::string(select_kernel().name); });
  m.def(
      "binary_conv",
      [](uintptr_t x, int64_t n, int64_t c, int64_t h, int64_t w, int64_t sxn, int64_t sxc, int64_t sxh,
         int64_t sxw, int64_t groups, uintptr_t wpacked, int64_t oc, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
         int64_t ph, int64_t pw, int64_t dh, int64_t dw, int pad_mode, uintptr_t wsum, uintptr_t scale,
         uintptr_t shift, int act, float lo, float hi, uintptr_t slope, uintptr_t y, int64_t oh, int64_t ow,
         int nthreads, bool timed, uintptr_t xbits, uintptr_t ybits) -> py::object {
        if (groups < 1 || c % groups || oc % groups) throw py::value_error("groups must divide c and oc");
        if (xbits && groups != 1) throw py::value_error("xbits: packed input needs groups == 1");
        if (ybits && groups > 1 && (oc / groups) % kNR) throw py::value_error("ybits: needs OC / groups % 32 == 0");
        if (pad_mode == kPadZeros && (ph || pw) && (kh > 64 || kw > 64))
          throw py::value_error("exact zero padding takes kernels of at most 64 x 64");
        ConvArgs a{reinterpret_cast<const float*>(x), n, c, h, w, sxn, sxc, sxh, sxw, groups,
                   reinterpret_cast<const uint64_t*>(wpacked), oc, kh, kw, sh, sw, ph, pw, dh, dw, pad_mode,
                   reinterpret_cast<const int32_t*>(wsum), reinterpret_cast<const float*>(scale),
                   reinterpret_cast<const float*>(shift), act, lo, hi, reinterpret_cast<const float*>(slope),
                   reinterpret_cast<float*>(y), oh, ow, reinterpret_cast<const uint64_t*>(xbits),
                   reinterpret_cast<uint64_t*>(ybits)};
        double phases[3] = {0.0, 0.0, 0.0};
        {
          py::gil_scoped_release nogil;
          conv(a, nthreads, timed ? phases : nullptr);
        }
        if (!timed) return py::none();
        return py::make_tuple(phases[0], phases[1], phases[2]);
      },
      py::arg("x"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("sxn"), py::arg("sxc"),
      py::arg("sxh"), py::arg("sxw"), py::arg("groups"), py::arg("wpacked"), py::arg("oc"), py::arg("kh"),
      py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
      py::arg("pad_mode"), py::arg("wsum"), py::arg("scale"), py::arg("shift"), py::arg("act"), py::arg("lo"),
      py::arg("hi"), py::arg("slope"), py::arg("y"), py::arg("oh"), py::arg("ow"), py::arg("nthreads"),
      py::arg("timed") = false, py::arg("xbits") = 0, py::arg("ybits") = 0,
      "the binary conv into y (NHWC); timed: returns (packing, correction table, tiles) wall seconds; "
      "xbits / ybits: the input / output as packed signs [N][H][W][ceil(C / 64)] words instead of x / y");
}

}  // namespace binary
}  // namespace pyaccel
