// pybind11 entry points of the fused depthwise-separable conv (registered by
// bindings.cpp through register_dws). Arguments are validated in Python
// (pyaccel/ops_conv.py); here only what Python cannot see: the packed header.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "dwconv_fused/dwconv_fused.h"
#include "int8_gemm/int8_gemm.h"

namespace py = pybind11;

namespace pyaccel {
namespace dws {
namespace {

// "" when `packed` is int8_gemm's packing of the [n, c] pointwise weight, else
// why, with the shape the buffer holds when it is such a packing at all.
std::string pw_packing_error(const uint8_t* packed, int64_t nbytes, int64_t n, int64_t c) {
  const char* e = int8_gemm::check_packed(packed, nbytes, n, c);
  if (e == nullptr) return "";
  std::string s = std::string(e) + " (expected the int8 packing of a [" + std::to_string(n) + ", " +
                  std::to_string(c) + "] pointwise weight";
  int8_gemm::PackedHeader h;
  if (packed != nullptr && nbytes >= static_cast<int64_t>(sizeof(h))) {
    std::memcpy(&h, packed, sizeof(h));
    if (h.magic == int8_gemm::kMagic)
      s += ", the buffer holds one of [" + std::to_string(h.n) + ", " + std::to_string(h.k) + "] in " +
           std::to_string(nbytes) + " bytes";
    else
      s += ", the buffer holds another format";
  }
  return s + ")";
}

}  // namespace

void register_dws(py::module_& m) {
  m.attr("HAS_DW_BIAS") = kHasDwBias;  // PackedHeader.flags: the biases a packing was given
  m.attr("HAS_PW_BIAS") = kHasPwBias;
  m.def("dws_kernel_name", [] { return std::string(select_kernel().name); });
  m.def("dws_params", [] {
    const Kernel& k = select_kernel();
    py::dict d;
    d["name"] = k.name;
    d["mr"] = k.mr;
    d["nr"] = k.nr;
    d["kr"] = 1;
    d["c_pad"] = kChannelPad;
    d["row_path_rows"] = 0;
    return d;
  });
  m.def("dws_packed_nbytes", [](int64_t c, int64_t n, int kh, int kw) {
    return packed_nbytes(c, n, kh, kw, select_kernel().nr);
  }, py::arg("c"), py::arg("n"), py::arg("kh"), py::arg("kw"));
  m.def(
      "dws_pack",
      [](uintptr_t wd, uintptr_t bd, uintptr_t wp, uintptr_t bp, int64_t c, int64_t n, int kh, int kw, int sh, int sw,
         int dh, int dw, int act1, float lo1, float hi1, int act2, float lo2, float hi2, uintptr_t out,
         int64_t out_nbytes) {
        if (c < 1 || n < 0 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || dh < 1 || dw < 1)
          throw py::value_error("dws_pack: bad shape");
        for (int a : {act1, act2})
          if (a < kNone || a > kHardtanh) throw py::value_error("dws_pack: unknown activation code");
        const int nr = select_kernel().nr;
        if (out_nbytes != packed_nbytes(c, n, kh, kw, nr)) throw py::value_error("out: wrong size for the packed weight");
        py::gil_scoped_release nogil;
        pack(reinterpret_cast<const float*>(wd), bd ? reinterpret_cast<const float*>(bd) : nullptr,
             reinterpret_cast<const float*>(wp), bp ? reinterpret_cast<const float*>(bp) : nullptr, c, n, kh, kw, sh,
             sw, dh, dw, ActParams{act1, lo1, hi1}, ActParams{act2, lo2, hi2}, nr, reinterpret_cast<uint8_t*>(out));
      },
      "pack folded depthwise [c, kh, kw] + bias [c] and pointwise [n, c] + bias [n] fp32 weights",
      py::arg("wd"), py::arg("bd"), py::arg("wp"), py::arg("bp"), py::arg("c"), py::arg("n"), py::arg("kh"),
      py::arg("kw"), py::arg("sh"), py::arg("sw"), py::arg("dh"), py::arg("dw"), py::arg("act1"), py::arg("lo1"),
      py::arg("hi1"), py::arg("act2"), py::arg("lo2"), py::arg("hi2"), py::arg("out"), py::arg("out_nbytes"));
  m.def(
      "dws_check_packed",
      [](uintptr_t packed, int64_t nbytes, int64_t c, int64_t n, int kh, int kw) -> py::object {
        if (const char* e = check_packed(reinterpret_cast<const uint8_t*>(packed), nbytes, c, n, kh, kw))
          return py::str(e);
        return py::none();
      },
      py::arg("packed"), py::arg("nbytes"), py::arg("c"), py::arg("n"), py::arg("kh"), py::arg("kw"));
  m.def(
      "dws_packing_error",
      [](uintptr_t packed, int64_t nbytes, int64_t c, int64_t n, int kh, int kw, int sh, int sw, int dh, int dw,
         int act1, float lo1, float hi1, int act2, float lo2, float hi2, int32_t flags) {
        const PackingSpec want{c, n, kh, kw, sh, sw, dh, dw, ActParams{act1, lo1, hi1}, ActParams{act2, lo2, hi2},
                               flags};
        return packing_error(reinterpret_cast<const uint8_t*>(packed), nbytes, want);
      },
      "'' when the DWS1 packing at `packed` (nbytes) was made for these parameters by a kernel of any ISA "
      "(flags: HAS_DW_BIAS, HAS_PW_BIAS), else what the call expected and what the buffer holds; header only",
      py::arg("packed"), py::arg("nbytes"), py::arg("c"), py::arg("n"), py::arg("kh"), py::arg("kw"), py::arg("sh"),
      py::arg("sw"), py::arg("dh"), py::arg("dw"), py::arg("act1"), py::arg("lo1"), py::arg("hi1"), py::arg("act2"),
      py::arg("lo2"), py::arg("hi2"), py::arg("flags"));
  m.def(
      "dws_pw_packing_error",
      [](uintptr_t packed, int64_t nbytes, int64_t n, int64_t c) {
        return pw_packing_error(reinterpret_cast<const uint8_t*>(packed), nbytes, n, c);
      },
      "'' when `packed` is the int8 packing of the [n, c] pointwise weight, else why: int8_gemm::check_packed, "
      "which reads the header and, where the packing has a pair-safe section, scans that section's tables "
      "(O(n + entries))",
      py::arg("packed"), py::arg("nbytes"), py::arg("n"), py::arg("c"));
  m.def(
      "dws_forward",
      [](uintptr_t x, int64_t batch, int64_t h, int64_t w, int64_t c, uintptr_t packed, int64_t packed_nbytes,
         int64_t n, int kh, int kw, uintptr_t y, int64_t oh, int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads) {
        if (const char* e = check_packed(reinterpret_cast<const uint8_t*>(packed), packed_nbytes, c, n, kh, kw))
          throw py::value_error(std::string("packed: ") + e);
        py::gil_scoped_release nogil;
        forward(reinterpret_cast<const float*>(x), batch, h, w, c, reinterpret_cast<const uint8_t*>(packed),
                reinterpret_cast<float*>(y), oh, ow, pad_t, pad_l, nthreads);
      },
      "y NHWC [batch, oh, ow, n] = fused depthwise-separable conv of x NHWC [batch, h, w, c] (contiguous fp32)",
      py::arg("x"), py::arg("batch"), py::arg("h"), py::arg("w"), py::arg("c"), py::arg("packed"),
      py::arg("packed_nbytes"), py::arg("n"), py::arg("kh"), py::arg("kw"), py::arg("y"), py::arg("oh"),
      py::arg("ow"), py::arg("pad_t"), py::arg("pad_l"), py::arg("nthreads"));
  m.def(
      "dws_forward_int8",
      [](uintptr_t x, int64_t batch, int64_t h, int64_t w, int64_t c, uintptr_t packed_dw, int64_t dw_nbytes,
         int kh, int kw, uintptr_t packed_i8, int64_t i8_nbytes, int64_t n, uintptr_t w_scale, uintptr_t bias,
         uintptr_t y, int64_t oh, int64_t ow, int64_t pad_t, int64_t pad_l, int nthreads) {
        if (const char* e = check_packed(reinterpret_cast<const uint8_t*>(packed_dw), dw_nbytes, c, 0, kh, kw))
          throw py::value_error(std::string("packed_dw: ") + e);
        const std::string e = pw_packing_error(reinterpret_cast<const uint8_t*>(packed_i8), i8_nbytes, n, c);
        if (!e.empty()) throw py::value_error("packed_pw: " + e);
        py::gil_scoped_release nogil;
        forward_int8(reinterpret_cast<const float*>(x), batch, h, w, c, reinterpret_cast<const uint8_t*>(packed_dw),
                     reinterpret_cast<const uint8_t*>(packed_i8), n, reinterpret_cast<const float*>(w_scale),
                     bias ? reinterpret_cast<const float*>(bias) : nullptr, reinterpret_cast<float*>(y), oh, ow,
                     pad_t, pad_l, nthreads);
      },
      "y NHWC [batch, oh, ow, n]: depthwise (fp32) then an int8 pointwise stage (per-pixel activations, "
      "per-channel weights), x NHWC contiguous fp32",
      py::arg("x"), py::arg("batch"), py::arg("h"), py::arg("w"), py::arg("c"), py::arg("packed_dw"),
      py::arg("dw_nbytes"), py::arg("kh"), py::arg("kw"), py::arg("packed_i8"), py::arg("i8_nbytes"), py::arg("n"),
      py::arg("w_scale"), py::arg("bias"), py::arg("y"), py::arg("oh"), py::arg("ow"), py::arg("pad_t"),
      py::arg("pad_l"), py::arg("nthreads"));
}

}  // namespace dws
}  // namespace pyaccel
