// pyaccel._C: plain C++ kernels behind a pybind11 module. No libtorch: Python
// passes data pointers, sizes and strides (as integers) and owns all memory,
// so one wheel works with every torch release. Arguments are validated on the
// Python side (pyaccel/ops.py); the checks here guard what Python cannot see
// (the packed layout header).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "common/peak.h"
#include "common/parallel.h"
#include "binary/binary.h"
#include "block_sparse/block_sparse.h"
#include "dwconv_fused/dwconv_fused.h"
#include "int8_gemm/int8_gemm.h"
#include "sparse24/sparse24.h"
#include "sparse24/sparse24_int8.h"

namespace py = pybind11;
using namespace pyaccel;

namespace pyaccel {
namespace binary {
py::dict kernel_params_binary();  // csrc/binary/bindings_binary.cpp
void register_binary(py::module_& m);
}  // namespace binary
}  // namespace pyaccel

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

py::dict cpu_info() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512dq"] = f.avx512dq;
  d["avx512vl"] = f.avx512vl;
  d["avx512_vnni"] = f.avx512vnni;
  d["avx512_vpopcntdq"] = f.avx512vpopcntdq;
  d["avx512_vbmi"] = f.avx512vbmi;
  d["avx512_bf16"] = f.avx512bf16;
  d["avx_vnni"] = f.avxvnni;
  d["amx_int8"] = f.amx_int8;  // AMX-INT8 in the CPU, its tile state enabled by the OS, and the AMX build
  d["amx_built"] = kAmxBuilt;
  d["avx_vnni_vex_built"] = kVexVnniBuilt;  // the assembler knew AVX-VNNI: the VEX builds exist
  d["detected_isa"] = isa_name(detected_isa());
  py::list usable;  // levels this CPU can run, best first
  // (the AMX level is listed unless its permission was refused; asking is left to its first selection)
  for (int i = static_cast<int>(kTopIsa); i >= 0; --i) {
    const Isa lv = static_cast<Isa>(i);
    const bool ok = lv == Isa::kAvx512Amx ? static_cast<int>(detected_isa()) >= i &&
                                                std::string(amx_permission()) != "refused"
                                          : isa_usable(lv);
    if (ok) usable.append(isa_name(lv));
  }
  d["usable_isas"] = usable;
  d["isa_cap"] = isa_name(isa_cap());
  d["selected_isa"] = isa_name(selected_isa());
  d["amx_permission"] = amx_permission();  // asked for when the AMX level is first selected
  d["omp_max_threads"] = max_threads();
  d["intel"] = f.intel;  // CPUID vendor GenuineIntel
  d["tuning"] = tuning_name(cpu_tuning());  // which core family's kernel variants run (set_cpu_tuning)
  d["tuning_override"] = tuning_override();  // the explicit setting, "" for the vendor's
  return d;
}

void check_packed_or_throw(uintptr_t packed, int64_t nbytes, int64_t n, int64_t k) {
  if (const char* err = int8_gemm::check_packed(ptr<const uint8_t>(packed), nbytes, n, k))
    throw py::value_error(std::string("packed_weight: ") + err);
}

// What the eager fast path (LinearPlan::forward) needs from torch, handed
// over once by pyaccel.nn._packed: the extension never imports torch itself.
// Leaked on purpose (no destructor runs after the interpreter is gone).
struct TorchRefs {
  PyTypeObject* tensor = nullptr;
  PyObject *empty, *f32, *bf16, *get_default_dtype, *get_num_threads, *get_tracing_state;
  PyObject* i64 = nullptr;  // torch.int64 (the binary plans' packed signs)
  PyObject *s_dtype;
  // torch.Tensor's own descriptors, looked up once: reading an attribute
  // through them skips the per-call lookup and bound-method creation
  // (3 watched tensors cost ~0.34 us per call through PyObject_GetAttr /
  // PyObject_CallMethod)
  PyObject *d_dtype, *d_is_cpu, *d_shape, *d_requires_grad, *d_version;  // getset descriptors
  PyObject *d_stride, *d_is_contiguous, *d_data_ptr;                       // method descriptors
};

// obj.<attr> through a descriptor of obj's type (new reference or null).
PyObject* get_attr(PyObject* descr, PyObject* obj) {
  descrgetfunc get = Py_TYPE(descr)->tp_descr_get;
  return get(descr, obj, reinterpret_cast<PyObject*>(Py_TYPE(obj)));
}

// obj.<method>() through the method's descriptor (new reference or null).
PyObject* call_method(PyObject* descr, PyObject* obj) {
  PyObject* args[1] = {obj};
  return PyObject_Vectorcall(descr, args, 1, nullptr);
}
// obj.<method>() for a query a tensor of another layout may refuse (sparse
// tensors raise from stride()): null, with the error cleared, so that the
// plan declines and the module's general path names the bad input.
PyObject* query_method(PyObject* descr, PyObject* obj) {
  PyObject* r = call_method(descr, obj);
  if (!r) PyErr_Clear();
  return r;
}
TorchRefs* g_torch = nullptr;

void set_torch_refs(py::handle tensor, py::handle empty, py::handle f32, py::handle bf16,
                    py::handle get_default_dtype, py::handle get_num_threads, py::handle get_tracing_state,
                    py::handle i64) {
  if (!PyType_Check(tensor.ptr())) throw py::type_error("tensor: expected torch.Tensor (a type)");
  auto* r = new TorchRefs;
  r->tensor = reinterpret_cast<PyTypeObject*>(tensor.inc_ref().ptr());
  r->empty = empty.inc_ref().ptr();
  r->f32 = f32.inc_ref().ptr();
  r->bf16 = bf16.inc_ref().ptr();
  r->get_default_dtype = get_default_dtype.inc_ref().ptr();
  r->get_num_threads = get_num_threads.inc_ref().ptr();
  r->get_tracing_state = get_tracing_state.inc_ref().ptr();
  r->i64 = i64.inc_ref().ptr();
  r->s_dtype = PyUnicode_InternFromString("dtype");
  auto lookup = [&](const char* name, bool method) {
    PyObject* d = PyObject_GetAttrString(tensor.ptr(), name);  // on the type: the descriptor itself
    if (!d) throw py::error_already_set();
    if (method ? !PyCallable_Check(d) : !Py_TYPE(d)->tp_descr_get)
      throw py::type_error(std::string("tensor: unexpected kind of attribute ") + name);
    return d;
  };
  r->d_dtype = lookup("dtype", false);
  r->d_is_cpu = lookup("is_cpu", false);
  r->d_shape = lookup("shape", false);
  r->d_requires_grad = lookup("requires_grad", false);
  r->d_version = lookup("_version", false);
  r->d_stride = lookup("stride", true);
  r->d_is_contiguous = lookup("is_contiguous", true);
  r->d_data_ptr = lookup("data_ptr", true);
  g_torch = r;
}

// BSR indices checked before any packing reads through them (the public ops
// take indices from anywhere): a message naming the bad index, or "".
std::string bsr_index_error(const int32_t* crow, const int32_t* col, int64_t n, int64_t k, int bh, int bw,
                            int64_t nnzb) {
  const int64_t nbr = (n + bh - 1) / bh, kb = (k + bw - 1) / bw;
  if (crow[0] != 0 || crow[nbr] != nnzb)
    return "crow_indices: expected to start at 0 and end at nnzb = " + std::to_string(nnzb);
  for (int64_t r = 0; r < nbr; ++r)  // all row pointers first: col is read only within [0, nnzb)
    if (crow[r + 1] < crow[r]) return "crow_indices: must not decrease (at " + std::to_string(r + 1) + ")";
  for (int64_t r = 0; r < nbr; ++r) {
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      if (col[b] < 0 || col[b] >= kb)
        return "col_indices: index " + std::to_string(col[b]) + " at position " + std::to_string(b) +
               " is out of range [0, " + std::to_string(kb) + ")";
      if (b > crow[r] && col[b] <= col[b - 1])
        return "col_indices: block row " + std::to_string(r) + " is not strictly increasing at position " +
               std::to_string(b) + " (unsorted or duplicate)";
    }
  }
  return "";
}

// One kernel's tile: rows per micro-tile, output channels per packed panel,
// inputs per packed K step (K is padded to it), rows served by its row path.
py::dict tile_params(const char* name, int mr, int nr, int64_t kr, int row_path_rows) {
  py::dict e;
  e["name"] = name;
  e["mr"] = mr;
  e["nr"] = nr;
  e["kr"] = kr;
  e["row_path_rows"] = row_path_rows;  // 0: no row path
  e["pass_bytes"] = kRowPassBytes;     // activation scratch per row pass
  return e;
}

// The selected kernels' tiles and thresholds, so tests can cross every boundary.
py::dict kernel_params() {
  py::dict d;
  const int8_gemm::Kernel& ki = int8_gemm::select_kernel();
  py::dict e8 = tile_params(ki.name, ki.mr, int8_gemm::kPanel, int8_gemm::kKGroup, ki.row_path_rows);
  // packings get a pair-safe section at this level where at most this fraction of their weights are residual entries
  e8["pair_safe_max_entry_fraction"] = int8_gemm::wants_pair_safe() ? int8_gemm::kPsMaxEntryFraction : 0.0;
  // the pair-safe path serves calls of at least pair_safe_from_rows rows
  e8["pair_safe_from_rows"] = int8_gemm::kPs8MinRows;
  // the row path serves up to row_path_rows_huge rows on layers of at least row_path_huge_weights weights
  // (counted as n * k_pad: k rounded up to the k group, kr)
  e8["row_path_rows_huge"] = ki.row_path_rows_huge ? ki.row_path_rows_huge : ki.row_path_rows;
  e8["row_path_huge_weights"] = int8_gemm::kRowPathHugeWeights;
  d["int8"] = e8;
  const int8_gemm::Kernel& k7 = int8_gemm::select_kernel(7);  // the opt-in 7-bit activation mode
  py::dict e7 = tile_params(k7.name, k7.mr, int8_gemm::kPanel, int8_gemm::kKGroup, k7.row_path_rows);
  // packings get a quad-safe section at this level where at most this fraction of their weights are residual
  // entries; the quad-safe path then serves calls of at least quad_safe_from_rows rows (from
  // quad_safe_from_rows_huge on layers of at least quad_safe_huge_weights weights, n * k_pad)
  e7["quad_safe_max_entry_fraction"] = int8_gemm::wants_quad_safe() ? int8_gemm::kPsMaxEntryFraction : 0.0;
  e7["quad_safe_from_rows"] = int8_gemm::kQsMinRows;
  e7["quad_safe_from_rows_huge"] = int8_gemm::kQsMinRowsHuge;
  e7["quad_safe_huge_weights"] = int8_gemm::kQsHugeWeights;
  e7["row_path_rows_huge"] = k7.row_path_rows_huge ? k7.row_path_rows_huge : k7.row_path_rows;
  e7["row_path_huge_weights"] = int8_gemm::kRowPathHugeWeights;
  d["int8_a7"] = e7;
  const sparse24::Kernel& ks = sparse24::select_kernel();
  py::dict e = tile_params(ks.name, ks.mr, sparse24::kPanel, 4 * sparse24::kBlockGroups, ks.row_path_rows);
  e["cols_from_rows"] = ks.cols ? ks.cols_from_rows : 0;  // the column kernel from this many rows (0: none)
  e["cols_nr"] = ks.cols_nr;
  e["cols_name"] = ks.cols ? ks.cols_name : "";  // the column kernel (AVX2: the variant of the CPU tuning)
  // the column kernel's k-blocks (see cols_kc_groups): whole K up to the first, blocks of about the second
  e["cols_whole_k_groups"] = ks.cols_kc_max > 0 ? ks.cols_kc_max : sparse24::kColsWholeKGroups;
  e["cols_k_block_groups"] = ks.cols_kc_max > 0 ? ks.cols_kc_max : sparse24::kColsKBlockGroups;
  d["sparse24"] = e;
  const sparse24_int8::Kernel& kq = sparse24_int8::select_kernel();
  e = tile_params(kq.name, kq.mr, sparse24_int8::kPanel, sparse24_int8::kQuadInputs, kq.row_path_rows);
  e["dense_from_rows"] = kq.dense_from_rows;  // the modules switch to dense int8 from here (0: never) ...
  // ... and back to the 2:4 kernel from here (0: never), on layers of >= big_layer_weights weights / smaller ones
  e["sparse_from_rows_big"] = kq.sparse_from_rows_big;
  e["sparse_from_rows_small"] = kq.sparse_from_rows_small;
  e["big_layer_weights"] = sparse24_int8::kBigLayerWeights;
  // the AVX2 kernel's pair-safe path from this many rows (packings with a section), on layers of
  // >= big_layer_weights weights / smaller ones
  e["pair_safe_from_rows_big"] = sparse24_int8::kPsMinRowsBig;
  e["pair_safe_from_rows_small"] = sparse24_int8::kPsMinRowsSmall;
  d["sparse24_int8"] = e;
  const block_sparse::Kernel& kb = block_sparse::select_kernel();
  e = tile_params(kb.name, kb.mr, block_sparse::kChannelPad, 1, 0);  // nr: block rows are padded to it
  d["block_sparse"] = e;
  const block_sparse::KernelI8& kbi = block_sparse::select_kernel_int8();
  e = tile_params(kbi.name, kbi.mr, block_sparse::kChannelPad, 4, 0);
  d["block_sparse_int8"] = e;
  const dws::Kernel& kd = dws::select_kernel();
  e = tile_params(kd.name, kd.mr, kd.nr, 1, 0);
  e["stream_min_bytes"] = dws::kStreamMinBytes;  // fp32 outputs from this size on: non-temporal stores
  d["dws"] = e;
  d["binary"] = binary::kernel_params_binary();
  return d;
}

// Owned reference to a Python object; throws the pending Python error on null.
py::object own(PyObject* o) {
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(o);
}

int64_t as_i64(PyObject* o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

uintptr_t data_ptr_of(PyObject* t, const TorchRefs* T) {
  const uintptr_t p = PyLong_AsUnsignedLongLong(own(call_method(T->d_data_ptr, t)).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  return p;
}

// A tensor's in-place version counter; -1 for tensors without one (inference
// tensors), whose in-place edits cannot be seen.
int64_t version_of(PyObject* t, const TorchRefs* T) {
  PyObject* v = get_attr(T->d_version, t);
  if (!v) {
    PyErr_Clear();
    return -1;
  }
  return as_i64(own(v).ptr());
}

// The canonical buffers a plan was made from: (name, tensor or None,
// check_version) entries and the module's _buffers dict. stale() is True once
// a buffer is another object than it was (assigned in any way, _buffers[...]
// included), has other data (.data swapped), or -- with check_version, for the
// buffers a packing was built from -- was edited in place (its version counter
// moved; buffers read in place need no version check).
class BufferWatch {
 public:
  BufferWatch(const py::tuple& watch, const py::object& buffers) {
    if (watch.size() > kMaxWatch) throw py::value_error("watch: at most 8 buffers");
    if (watch.size() && !g_torch) throw py::value_error("watch: set_torch_refs first");
    if (!buffers.is_none() && !PyDict_Check(buffers.ptr())) throw py::type_error("buffers: expected a dict");
    buffers_ = buffers;
    for (py::handle e : watch) {
      const py::tuple entry = py::reinterpret_borrow<py::tuple>(e);
      if (entry.size() != 3) throw py::value_error("watch: expected (name, tensor or None, check_version) entries");
      Watched& w = watched_[n_watched_++];
      w.name = py::reinterpret_borrow<py::str>(entry[0]);
      w.obj = py::reinterpret_borrow<py::object>(entry[1]);
      if (w.obj.is_none()) continue;
      w.data = data_ptr_of(w.obj.ptr(), g_torch);
      w.shape = own(get_attr(g_torch->d_shape, w.obj.ptr()));
      w.version = entry[2].cast<bool>() ? version_of(w.obj.ptr(), g_torch) : kNoVersionCheck;
      if (w.version == -1) w.version = kNoVersionCheck;  // an inference tensor: no counter to read
    }
  }

  bool stale() const {
    for (int i = 0; i < n_watched_; ++i) {
      const Watched& w = watched_[i];
      if (!buffers_.is_none()) {
        PyObject* cur = PyDict_GetItemWithError(buffers_.ptr(), w.name.ptr());
        if (!cur && PyErr_Occurred()) throw py::error_already_set();
        if ((cur ? cur : Py_None) != w.obj.ptr()) return true;
      }
      if (w.obj.is_none()) continue;
      if (data_ptr_of(w.obj.ptr(), g_torch) != w.data) return true;
      // a .data swap for a view of the same memory keeps the pointer, not the shape
      const int same = PyObject_RichCompareBool(own(get_attr(g_torch->d_shape, w.obj.ptr())).ptr(), w.shape.ptr(), Py_EQ);
      if (same < 0) throw py::error_already_set();
      if (!same) return true;
      if (w.version != kNoVersionCheck && version_of(w.obj.ptr(), g_torch) != w.version) return true;
    }
    return false;
  }

 private:
  py::object buffers_;
  struct Watched {
    py::str name;
    py::object obj;
    uintptr_t data = 0;
    py::object shape;
    int64_t version = 0;
  };
  static constexpr size_t kMaxWatch = 8;
  static constexpr int64_t kNoVersionCheck = INT64_MIN;
  Watched watched_[kMaxWatch];
  int n_watched_ = 0;
};

// y = torch.empty(dims) as float32 on the CPU (the dtype keyword only when the
// default dtype is not float32: it costs ~0.4 us); None in a default-device
// context that puts it elsewhere.
py::object empty_f32(const TorchRefs* T, PyObject* dims) {
  py::object y;
  if (own(PyObject_CallNoArgs(T->get_default_dtype)).ptr() == T->f32) {
    y = own(PyObject_Call(T->empty, dims, nullptr));
  } else {
    py::dict kw;
    kw[py::handle(T->s_dtype)] = py::handle(T->f32);
    y = own(PyObject_Call(T->empty, dims, kw.ptr()));
  }
  if (own(get_attr(T->d_is_cpu, y.ptr())).ptr() != Py_True) return py::none();
  return y;
}

// A validated linear layer over one packed weight (int8, 2:4 fp32 or 2:4
// int8): packed buffer, scales and bias checked once, so that the per-call
// path converts only six arguments. `keep` holds what owns that memory (the
// modules pass the tensors' storages): the plan never outlives it, even when a
// tensor's .data is swapped for another. `watch` holds (name, tensor or None,
// check_version) for each canonical buffer of the module, `buffers` the
// module's _buffers dict: the plan is stale() once a buffer is another object
// than it was (assigned in any way, _buffers[...] included), has other data
// (.data swapped), or -- with check_version, for the weights the packing was
// built from -- was edited in place (its version counter moved; scales and
// bias are read in place, so their edits are seen anyway). forward() then
// declines, so that the module repacks.
class LinearPlan {
 public:
  enum class Kind { kInt8, kInt8A7, kSparse24, kSparse24Int8, kBlockSparse, kBlockSparseInt8 };

  LinearPlan(const std::string& kind, uintptr_t packed, int64_t packed_nbytes, int64_t n, int64_t k,
             uintptr_t w_scale, uintptr_t bias, py::object keep, py::tuple watch = py::tuple(),
             py::object buffers = py::none())
      : packed_(packed), n_(n), k_(k), w_scale_(w_scale), bias_(bias), keep_(std::move(keep)), watch_(watch, buffers) {
    if (!packed) throw py::value_error("packed: null pointer");
    const char* err = nullptr;
    if (kind == "int8" || kind == "int8_a7") {  // int8_a7: 7-bit activations (int8_gemm::select_kernel)
      kind_ = kind == "int8" ? Kind::kInt8 : Kind::kInt8A7;
      err = int8_gemm::check_packed(ptr<const uint8_t>(packed), packed_nbytes, n, k);
    } else if (kind == "sparse24") {
      kind_ = Kind::kSparse24;
      err = sparse24::check_packed(ptr<const uint8_t>(packed), packed_nbytes, n, k);
    } else if (kind == "sparse24_int8") {
      kind_ = Kind::kSparse24Int8;
      err = sparse24_int8::check_packed(ptr<const uint8_t>(packed), packed_nbytes, n, k);
    } else if (kind == "block_sparse") {
      kind_ = Kind::kBlockSparse;
      err = block_sparse::check_packed(ptr<const uint8_t>(packed), packed_nbytes, n, k);
    } else if (kind == "block_sparse_int8") {
      kind_ = Kind::kBlockSparseInt8;
      err = block_sparse::check_packed_int8(ptr<const uint8_t>(packed), packed_nbytes, n, k);
    } else {
      throw py::value_error("kind: expected 'int8', 'int8_a7', 'sparse24', 'sparse24_int8', 'block_sparse' or "
                            "'block_sparse_int8', got '" + kind +
                            "'");
    }
    if (err) throw py::value_error(std::string("packed_weight: ") + err);
    if (kind_ != Kind::kSparse24 && kind_ != Kind::kBlockSparse && !w_scale)
      throw py::value_error("w_scale: null pointer");
    sections_ = reads_sections(kind_);
  }

  // Which optional parts of its packing the level in use reads for this kind
  // of plan (0: none): the int8 AVX2 kernels' pair-safe / quad-safe sections
  // (int8_gemm.h, PsHeader), the 2:4 int8 kernels' sparse24_int8::wanted_parts().
  static int reads_sections(Kind k) {
    if (k == Kind::kInt8) return int8_gemm::wants_pair_safe() ? 1 : 0;
    if (k == Kind::kInt8A7) return int8_gemm::wants_quad_safe() ? 1 : 0;
    if (k == Kind::kSparse24Int8) return sparse24_int8::wanted_parts();
    return 0;
  }

  // The eager fast path, what PackedModule._run_plan does in Python, ~0.8 µs
  // cheaper per call (1.9 vs 2.7 µs with a 32x32 layer's kernel): y = layer(x) into a fresh tensor for a plain CPU
  // fp32/bf16 torch.Tensor of rows -- 2-D with unit stride along k, or
  // contiguous N-D with N > 2 -- unless switches(m) (a 2:4 int8 plan with a
  // dense plan attached runs the rows where dense wins with that one); None for anything else (the caller then takes its general path).
  // Declines (None) too when x requires grad (the module's autograd op runs
  // instead), under torch.jit.trace (which records only torch ops), and when
  // the plan is stale.
  py::object forward(py::handle xh) const {
    const TorchRefs* T = g_torch;
    PyObject* x = xh.ptr();
    if (!T || Py_TYPE(x) != T->tensor) return py::none();
    if (own(get_attr(T->d_requires_grad, x)).ptr() != Py_False) return py::none();
    if (own(PyObject_CallNoArgs(T->get_tracing_state)).ptr() != Py_None) return py::none();
    if (stale()) return py::none();
    py::object dt = own(get_attr(T->d_dtype, x));
    const bool bf16 = dt.ptr() == T->bf16;
    if (!bf16 && dt.ptr() != T->f32) return py::none();
    if (own(get_attr(T->d_is_cpu, x)).ptr() != Py_True) return py::none();
    py::object shape = own(get_attr(T->d_shape, x));
    if (!PyTuple_Check(shape.ptr())) return py::none();
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
    if (nd < 2 || as_i64(PyTuple_GET_ITEM(shape.ptr(), nd - 1)) != k_) return py::none();
    int64_t m, ldx;
    if (nd == 2) {
      PyObject* st_raw = query_method(T->d_stride, x);
      if (!st_raw) return py::none();
      py::object st = own(st_raw);
      if (!PyTuple_Check(st.ptr()) || PyTuple_GET_SIZE(st.ptr()) != 2 || as_i64(PyTuple_GET_ITEM(st.ptr(), 1)) != 1)
        return py::none();
      m = as_i64(PyTuple_GET_ITEM(shape.ptr(), 0));
      ldx = as_i64(PyTuple_GET_ITEM(st.ptr(), 0));
    } else {
      PyObject* contiguous = query_method(T->d_is_contiguous, x);
      if (!contiguous || own(contiguous).ptr() != Py_True) return py::none();
      m = 1;
      for (Py_ssize_t i = 0; i + 1 < nd; ++i) m *= as_i64(PyTuple_GET_ITEM(shape.ptr(), i));
      ldx = k_;
    }
    const LinearPlan* target = this;
    py::object hold;  // keeps the dense plan alive while it runs without the GIL
    if (switches(m)) {
      // a 2:4 int8 plan where its kernel says dense int8 wins runs the dense
      // int8 plan the module attached (dense), when it has one. No staleness
      // check of its own: it was packed from this plan's buffers, and this
      // plan is current (checked above); its packing belongs to the module.
      if (!dense_ || m >= dense_->max_rows) return py::none();
      target = dense_;
      hold = dense_obj_;
    }
    // y = torch.empty(*shape[:-1], n[, dtype=x.dtype]): the keyword only when
    // x's dtype is not the default (it costs ~0.4 µs)
    py::object dims = own(PyTuple_New(nd));
    for (Py_ssize_t i = 0; i + 1 < nd; ++i) {
      PyObject* d = PyTuple_GET_ITEM(shape.ptr(), i);
      Py_INCREF(d);
      PyTuple_SET_ITEM(dims.ptr(), i, d);
    }
    PyTuple_SET_ITEM(dims.ptr(), nd - 1, own(PyLong_FromLongLong(n_)).release().ptr());
    py::object y;
    if (own(PyObject_CallNoArgs(T->get_default_dtype)).ptr() == dt.ptr()) {
      y = own(PyObject_Call(T->empty, dims.ptr(), nullptr));
    } else {
      py::dict kw;
      kw[py::handle(T->s_dtype)] = dt;
      y = own(PyObject_Call(T->empty, dims.ptr(), kw.ptr()));
    }
    if (own(get_attr(T->d_is_cpu, y.ptr())).ptr() != Py_True) return py::none();  // a default-device context
    const uintptr_t xp = PyLong_AsUnsignedLongLong(own(call_method(T->d_data_ptr, x)).ptr());
    const uintptr_t yp = PyLong_AsUnsignedLongLong(own(call_method(T->d_data_ptr, y.ptr())).ptr());
    const int64_t nthreads = as_i64(own(PyObject_CallNoArgs(T->get_num_threads)).ptr());
    if (PyErr_Occurred()) throw py::error_already_set();
    target->run(xp, ldx, bf16, m, yp, static_cast<int>(nthreads));
    return y;
  }

  // True when a watched tensor's data pointer or version counter moved since
  // the plan was made, or when an ISA-cap change crossed into or out of a
  // level that reads pair-safe sections (the packing gets or drops one on repack).
  bool stale() const { return watch_.stale() || reads_sections(kind_) != sections_; }

  // The dense int8 plan a 2:4 int8 plan's forward runs where switches(m)
  // (None: forward declines those rows and the module switches in Python).
  // It must be the same layer's: an 'int8' plan of the same n and k over the
  // same weight scales and bias.
  py::object dense() const { return dense_obj_; }
  void set_dense(py::object d) {
    if (d.is_none()) {
      dense_ = nullptr;
      dense_obj_ = py::none();
      return;
    }
    if (kind_ != Kind::kSparse24Int8) throw py::value_error("dense: only a 'sparse24_int8' plan takes a dense plan");
    if (!py::isinstance<LinearPlan>(d))
      throw py::type_error(std::string("dense: expected a LinearPlan or None, got ") +
                           std::string(py::str(py::type::of(d).attr("__name__"))));
    const LinearPlan* p = d.cast<const LinearPlan*>();
    if (p->kind_ != Kind::kInt8 || p->n_ != n_ || p->k_ != k_ || p->w_scale_ != w_scale_ || p->bias_ != bias_)
      throw py::value_error("dense: expected an 'int8' LinearPlan of the same n and k over the same weight scales "
                            "and bias");
    dense_ = p;
    dense_obj_ = std::move(d);
  }

  // forward() declines calls of this many rows or more (a module whose
  // kernel loses to another there switches in Python; a 2:4 int8 plan with a
  // dense plan switches itself, see switches() and dense())
  int64_t max_rows = INT64_MAX;
  // True when forward does not run m rows itself: m >= max_rows, or for a 2:4
  // int8 plan where the kernel selected now says dense int8 wins (read per
  // call: the ISA cap may have changed since the plan was made)
  bool switches(int64_t m) const {
    if (m >= max_rows) return true;
    return kind_ == Kind::kSparse24Int8 && sparse24_int8::dense_wins(m, n_, k_);
  }

  void run(uintptr_t x, int64_t ldx, bool bf16, int64_t m, uintptr_t y, int nthreads) const {
    py::gil_scoped_release nogil;
    const float* bias = bias_ ? ptr<const float>(bias_) : nullptr;
    switch (kind_) {
      case Kind::kInt8:
      case Kind::kInt8A7:
        int8_gemm::linear(ptr<const void>(x), ldx, bf16, m, k_, ptr<const uint8_t>(packed_),
                          ptr<const float>(w_scale_), bias, ptr<void>(y), n_, bf16, nthreads,
                          kind_ == Kind::kInt8A7 ? 7 : 8);
        break;
      case Kind::kSparse24:
        sparse24::linear(ptr<const void>(x), ldx, bf16, m, k_, ptr<const uint8_t>(packed_), bias, ptr<void>(y),
                         n_, bf16, nthreads);
        break;
      case Kind::kSparse24Int8:
        sparse24_int8::linear(ptr<const void>(x), ldx, bf16, m, k_, ptr<const uint8_t>(packed_),
                              ptr<const float>(w_scale_), bias, ptr<void>(y), n_, bf16, nthreads);
        break;
      case Kind::kBlockSparse:
        block_sparse::linear(ptr<const void>(x), ldx, bf16, m, k_, ptr<const uint8_t>(packed_), bias, ptr<void>(y),
                             n_, bf16, nthreads);
        break;
      case Kind::kBlockSparseInt8:
        block_sparse::linear_int8(ptr<const void>(x), ldx, bf16, m, k_, ptr<const uint8_t>(packed_),
                                  ptr<const float>(w_scale_), bias, ptr<void>(y), n_, bf16, nthreads);
        break;
    }
  }

 private:
  Kind kind_ = Kind::kInt8;
  int sections_ = 0;  // reads_sections(kind_) when made
  uintptr_t packed_;
  int64_t n_, k_;
  uintptr_t w_scale_, bias_;
  py::object keep_;
  BufferWatch watch_;
  const LinearPlan* dense_ = nullptr;  // held by dense_obj_
  py::object dense_obj_ = py::none();
};

// One XnorConv2d / XnorLinear call prepared for one input shape and strides
// (in_bits / out_bits: the packed-sign hand-off, x / y int64 [N, H, W, words])
// (pyaccel.nn.xnor): the binary conv's arguments checked once in Python,
// `keep` owning the memory they point to, `watch` the module's canonical
// buffers. forward(x) runs it on a plain CPU fp32 tensor of exactly that
// shape and those strides into a fresh output and returns it as the module
// does (layout 0: [N, OC, OH, OW] contiguous, 1: the same in channels_last
// memory, 2: the [N, OC] rows as they are, 3: viewed as out_shape); None for
// anything else, when x requires grad, under torch.jit.trace, or when the
// plan is stale. About as fast as the bare native call, and much less
// Python for a cold cache to stall on.
class BinaryConvPlan {
 public:
  BinaryConvPlan(py::tuple x_shape, py::tuple x_strides, py::tuple y_shape, int layout, py::tuple out_shape,
                 bool in_bits, bool out_bits,
                 int64_t n, int64_t c, int64_t h, int64_t w, int64_t sxn, int64_t sxc, int64_t sxh, int64_t sxw,
                 int64_t groups, uintptr_t wpacked, int64_t oc, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                 int64_t ph, int64_t pw, int64_t dh, int64_t dw, int pad_mode, uintptr_t wsum, uintptr_t scale,
                 uintptr_t shift, int act, float lo, float hi, uintptr_t slope, int64_t oh, int64_t ow,
                 py::object keep, py::tuple watch, py::object buffers)
      : x_shape_(std::move(x_shape)), x_strides_(std::move(x_strides)), y_shape_(std::move(y_shape)),
        out_shape_(std::move(out_shape)), layout_(layout), in_bits_(in_bits), out_bits_(out_bits),
        keep_(std::move(keep)), watch_(watch, buffers) {
    if (!g_torch) throw py::value_error("set_torch_refs first");
    if ((in_bits || out_bits) && (!g_torch->i64 || g_torch->i64 == Py_None))
      throw py::value_error("in_bits / out_bits: set_torch_refs without int64");
    if (in_bits && groups != 1) throw py::value_error("in_bits: packed input needs groups == 1");
    if (out_bits && groups > 1 && (oc / groups) % binary::kNR) throw py::value_error("out_bits: OC / groups % 32");
    if (layout < 0 || layout > 3) throw py::value_error("layout: expected 0 - 3");
    if (groups < 1 || c % groups || oc % groups) throw py::value_error("groups must divide c and oc");
    if (!wpacked || !wsum || !scale || (act == binary::kActPrelu && !slope))
      throw py::value_error("weights / wsum / scale / slope: null pointer");
    if (n < 1 || oh < 1 || ow < 1) throw py::value_error("n / oh / ow: expected >= 1");
    a_ = binary::ConvArgs{nullptr, n, c, h, w, sxn, sxc, sxh, sxw, groups,
                          ptr<const uint64_t>(wpacked), oc, kh, kw, sh, sw, ph, pw, dh, dw, pad_mode,
                          ptr<const int32_t>(wsum), ptr<const float>(scale), ptr<const float>(shift), act, lo, hi,
                          ptr<const float>(slope), nullptr, oh, ow};
    border_ = binary::border_table(a_);  // wsum and the geometry are fixed for this plan (a stale plan declines)
    s_permute_ = own(PyUnicode_InternFromString("permute"));
    s_contiguous_ = own(PyUnicode_InternFromString("contiguous"));
    s_view_ = own(PyUnicode_InternFromString("view"));
    nchw_ = py::make_tuple(0, 3, 1, 2);
  }

  py::object forward(py::handle xh) const {
    const TorchRefs* T = g_torch;
    PyObject* x = xh.ptr();
    if (Py_TYPE(x) != T->tensor) return py::none();
    if (own(get_attr(T->d_requires_grad, x)).ptr() != Py_False) return py::none();
    if (own(PyObject_CallNoArgs(T->get_tracing_state)).ptr() != Py_None) return py::none();
    if (own(get_attr(T->d_dtype, x)).ptr() != (in_bits_ ? T->i64 : T->f32)) return py::none();
    if (own(get_attr(T->d_is_cpu, x)).ptr() != Py_True) return py::none();
    py::object shape = own(get_attr(T->d_shape, x));
    if (!equal(shape.ptr(), x_shape_.ptr())) return py::none();
    PyObject* st_raw = query_method(T->d_stride, x);
    if (!st_raw) return py::none();
    py::object st = own(st_raw);
    if (!equal(st.ptr(), x_strides_.ptr())) return py::none();
    if (watch_.stale()) return py::none();
    py::object y;
    if (out_bits_) {
      py::dict kw;
      kw[py::handle(T->s_dtype)] = py::handle(T->i64);
      y = own(PyObject_Call(T->empty, y_shape_.ptr(), kw.ptr()));
      if (own(get_attr(T->d_is_cpu, y.ptr())).ptr() != Py_True) return py::none();
    } else {
      y = empty_f32(T, y_shape_.ptr());
      if (y.is_none()) return y;
    }
    binary::ConvArgs a = a_;
    const uintptr_t xp = data_ptr_of(x, T), yp = data_ptr_of(y.ptr(), T);
    if (in_bits_) a.xbits = ptr<const uint64_t>(xp); else a.x = ptr<const float>(xp);
    if (out_bits_) {
      a.ybits = ptr<uint64_t>(yp);
      int64_t words = 1;
      for (py::handle d : y_shape_) words *= d.cast<int64_t>();
      std::memset(ptr<void>(yp), 0, sizeof(uint64_t) * words);  // channels past OC stay 0
    } else {
      a.y = ptr<float>(yp);
    }
    const int64_t nthreads = as_i64(own(PyObject_CallNoArgs(T->get_num_threads)).ptr());
    {
      py::gil_scoped_release nogil;
      binary::conv(a, static_cast<int>(nthreads), nullptr, &border_);
    }
    switch (layout_) {
      case 0: {
        py::object p = own(PyObject_CallMethodOneArg(y.ptr(), s_permute_.ptr(), nchw_.ptr()));
        return own(PyObject_CallMethodNoArgs(p.ptr(), s_contiguous_.ptr()));
      }
      case 1: return own(PyObject_CallMethodOneArg(y.ptr(), s_permute_.ptr(), nchw_.ptr()));
      case 3: return own(PyObject_CallMethodOneArg(y.ptr(), s_view_.ptr(), out_shape_.ptr()));
      default: return y;
    }
  }

  bool stale() const { return watch_.stale(); }

 private:
  static bool equal(PyObject* a, PyObject* b) {
    const int r = PyObject_RichCompareBool(a, b, Py_EQ);
    if (r < 0) throw py::error_already_set();
    return r == 1;
  }
  py::tuple x_shape_, x_strides_, y_shape_, out_shape_;
  int layout_;
  bool in_bits_, out_bits_;
  binary::ConvArgs a_{};
  binary::BorderTable border_;
  py::object keep_;
  BufferWatch watch_;
  py::object s_permute_, s_contiguous_, s_view_, nchw_;
};

// The 2:4 fp32 packer (values + one position byte per group).
template <typename V>
void def_pack24(py::module_& m, const char* name, int64_t (*nbytes)(int64_t, int64_t),
                void (*pack)(const V*, int64_t, const uint8_t*, int64_t, int64_t, int64_t, uint8_t*),
                const char* size_error) {
  m.def(
      name,
      [=](uintptr_t values, int64_t ldv, uintptr_t pos, int64_t ldp, int64_t n, int64_t k, uintptr_t out,
          int64_t out_nbytes) {
        if (out_nbytes != nbytes(n, k)) throw py::value_error(size_error);
        py::gil_scoped_release nogil;
        pack(ptr<const V>(values), ldv, ptr<const uint8_t>(pos), ldp, n, k, ptr<uint8_t>(out));
      },
      py::arg("values"), py::arg("ldv"), py::arg("pos"), py::arg("ldp"), py::arg("n"), py::arg("k"),
      py::arg("out"), py::arg("out_nbytes"));
}

// bsr_check_packed / bsr_int8_check_packed: '' when the buffer is the packing
// (format of `check`) of an [n, k] weight of nnzb bh x bw blocks in the pattern
// crow / col (int32, contiguous), else what differs.
void def_bsr_check(py::module_& m, const char* name,
                   std::string (*check)(const uint8_t*, int64_t, int64_t, int64_t, int, int, int64_t,
                                        const int32_t*, const int32_t*),
                   const char* doc) {
  m.def(
      name,
      [=](uintptr_t packed, int64_t nbytes, int64_t n, int64_t k, int bh, int bw, int64_t nnzb, uintptr_t crow,
          uintptr_t col) {
        return check(ptr<const uint8_t>(packed), nbytes, n, k, bh, bw, nnzb, ptr<const int32_t>(crow),
                     ptr<const int32_t>(col));
      },
      doc, py::arg("packed"), py::arg("nbytes"), py::arg("n"), py::arg("k"), py::arg("bh"), py::arg("bw"),
      py::arg("nnzb"), py::arg("crow"), py::arg("col"));
}

}  // namespace

namespace pyaccel {
namespace dws {
void register_dws(py::module_& m);  // csrc/dwconv_fused/bindings_dws.cpp
}  // namespace dws
}  // namespace pyaccel

PYBIND11_MODULE(_C, m) {
  binary::register_binary(m);
  m.doc() = "pyaccel native CPU kernels (no libtorch; pointers in, pointers out)";
  m.def(
      "measure_peak",
      [](const std::string& kind, int nthreads, double seconds, int repeats) {
        peak::Result r;
        {
          py::gil_scoped_release release;
          r = peak::measure(kind.c_str(), nthreads, seconds, repeats);
        }
        return py::make_tuple(r.gops, std::string(r.mix));
      },
      py::arg("kind"), py::arg("nthreads"), py::arg("seconds") = 0.05, py::arg("repeats") = 5,
      "(G ops/s, instruction mix) of the selected ISA level's int8 or fp32 multiply-add mix on "
      "nthreads threads, median of `repeats` runs; (0.0, '') where the level has no SIMD mix");
  dws::register_dws(m);
  m.def("cpu_info", &cpu_info, "CPU features, detected/capped/selected ISA");
  m.def("late_team_trips", &late_team_trips,
        "how many times a team whose threads started late sent the kernels to one thread for "
        "kSerialSeconds (0.2 s) in this process (PYACCEL_LATE_TEAM_GUARD)");
  m.def("serial_for_now", &serial_for_now,
        "whether the late-team guard has the kernels on one thread right now (for tests of the teams)");
  m.def("set_isa_cap", &set_isa_cap, py::arg("name"),
        "Cap the ISA (avx512_icl|avx512_vnni|avx512|avx_vnni|avx2|portable, '' = none); returns False for an unknown name");
  m.def("selected_isa", [] { return std::string(isa_name(selected_isa())); });
  m.def("set_cpu_tuning", &set_cpu_tuning, py::arg("name"),
        "Take the kernel variants tuned for 'intel' or 'amd' cores where an op has both ('' = the CPU vendor's); "
        "returns False for an unknown name");
  m.def("set_torch_refs", &set_torch_refs, py::arg("tensor"), py::arg("empty"), py::arg("float32"),
        py::arg("bfloat16"), py::arg("get_default_dtype"), py::arg("get_num_threads"), py::arg("get_tracing_state"),
        py::arg("int64") = py::none(),
        "hand over the torch objects LinearPlan.forward uses (pyaccel does this on import)");
  m.def(
      "int8_kernel_name",
      [](int act_bits) {
        if (act_bits != 8 && act_bits != 7) throw py::value_error("act_bits: expected 8 or 7");
        return std::string(int8_gemm::select_kernel(act_bits).name);
      },
      py::arg("act_bits") = 8);
  m.def("kernel_params", &kernel_params,
        "tile sizes and thresholds of the kernels selected now, per op (tests derive their grids from them)");

  py::class_<LinearPlan>(m, "LinearPlan")
      .def(py::init<const std::string&, uintptr_t, int64_t, int64_t, int64_t, uintptr_t, uintptr_t, py::object,
                    py::tuple, py::object>(),
           py::arg("kind"), py::arg("packed"), py::arg("packed_nbytes"), py::arg("n"), py::arg("k"),
           py::arg("w_scale"), py::arg("bias"), py::arg("keep"), py::arg("watch") = py::tuple(),
           py::arg("buffers") = py::none())
      .def("stale", &LinearPlan::stale,
           "True when a watched tensor has other data or was edited in place since the plan was made")
      .def("forward", &LinearPlan::forward, py::arg("x"),
           "y = the layer applied to a plain CPU fp32/bf16 tensor of rows (2-D with unit stride along k, "
           "or contiguous N-D) of fewer than max_rows rows (a 2:4 int8 plan: below its kernel's switch point, "
           "or any count with a dense plan attached), into a fresh tensor of x's dtype; None otherwise "
           "(and when x requires grad, under torch.jit.trace, or when the plan is stale)")
      .def_readwrite("max_rows", &LinearPlan::max_rows)
      .def_property("dense", &LinearPlan::dense, &LinearPlan::set_dense,
                    "a 2:4 int8 plan's dense int8 plan (same n, k): forward runs it from the 2:4 kernel's switch "
                    "point on (None: forward declines those rows)")
      .def("__call__", &LinearPlan::run, py::arg("x"), py::arg("ldx"), py::arg("bf16"), py::arg("m"),
           py::arg("y"), py::arg("nthreads"),
           "y[m, n] (row stride n, x's dtype) = the layer applied to x[m, k] (row stride ldx)");
  py::class_<BinaryConvPlan>(m, "BinaryConvPlan")
      .def(py::init<py::tuple, py::tuple, py::tuple, int, py::tuple, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, uintptr_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                    int64_t, int64_t, int64_t, int64_t, int, uintptr_t, uintptr_t, uintptr_t, int, float, float,
                    uintptr_t, int64_t, int64_t, py::object, py::tuple, py::object>(),
           py::arg("x_shape"), py::arg("x_strides"), py::arg("y_shape"), py::arg("layout"), py::arg("out_shape"),
           py::arg("in_bits"), py::arg("out_bits"),
           py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"), py::arg("sxn"), py::arg("sxc"), py::arg("sxh"),
           py::arg("sxw"), py::arg("groups"), py::arg("wpacked"), py::arg("oc"), py::arg("kh"), py::arg("kw"),
           py::arg("sh"), py::arg("sw"), py::arg("ph"), py::arg("pw"), py::arg("dh"), py::arg("dw"),
           py::arg("pad_mode"), py::arg("wsum"), py::arg("scale"), py::arg("shift"), py::arg("act"), py::arg("lo"),
           py::arg("hi"), py::arg("slope"), py::arg("oh"), py::arg("ow"), py::arg("keep"), py::arg("watch"),
           py::arg("buffers"))
      .def("forward", &BinaryConvPlan::forward, py::arg("x"),
           "the prepared binary conv on x (a plain CPU fp32 tensor of the plan's shape and strides) into a fresh "
           "output in the module's layout; None otherwise (and when x requires grad, under torch.jit.trace, or "
           "when the plan is stale)")
      .def("stale", &BinaryConvPlan::stale);
  m.def(
      "linear",
      [](const std::string& kind, uintptr_t x, int64_t ldx, bool bf16, int64_t m, int64_t k, uintptr_t packed,
         int64_t packed_nbytes, int64_t n, uintptr_t w_scale, uintptr_t bias, uintptr_t y, int nthreads) {
        LinearPlan(kind, packed, packed_nbytes, n, k, w_scale, bias, py::none()).run(x, ldx, bf16, m, y, nthreads);
      },
      "one call of a LinearPlan (validated per call): y[m, n] (row stride n, x's dtype) from x[m, k]",
      py::arg("kind"), py::arg("x"), py::arg("ldx"), py::arg("bf16"), py::arg("m"), py::arg("k"),
      py::arg("packed"), py::arg("packed_nbytes"), py::arg("n"), py::arg("w_scale"), py::arg("bias"),
      py::arg("y"), py::arg("nthreads"));
  m.def("s24_kernel_name", [] {
    const sparse24::Kernel& k = sparse24::select_kernel();
    std::string s = k.name;
    if (k.cols) s += " / " + std::string(k.cols_name) + " from " + std::to_string(k.cols_from_rows) + " rows";
    return s;
  });
  m.def("s24_packed_nbytes", &sparse24::packed_nbytes, py::arg("n"), py::arg("k"));
  def_pack24(m, "s24_pack", &sparse24::packed_nbytes, &sparse24::pack, "out: wrong size for the packed 2:4 weight");
  m.def("s24i8_kernel_name", [] { return std::string(sparse24_int8::select_kernel().name); });
  m.def("s24i8_dense_wins", &sparse24_int8::dense_wins, py::arg("m"), py::arg("n"), py::arg("k"),
        "True when the selected 2:4 int8 kernel says dense int8 is faster at m rows of an n x k layer");
  m.def("s24i8_dense_from_rows", [] { return sparse24_int8::select_kernel().dense_from_rows; },
        "rows from which the dense int8 kernel beats the selected 2:4 int8 kernel (0: never), up to the "
        "kernel_params()['sparse24_int8'] sparse_from_rows_* (see s24i8_dense_wins)");
  m.def("s24i8_packed_nbytes", &sparse24_int8::packed_nbytes, py::arg("n"), py::arg("k"));
  m.def("s24i8_packed_nbytes_ctrl", &sparse24_int8::packed_nbytes_ctrl, py::arg("n"), py::arg("k"),
        "bytes of the 2:4 int8 packing with the AVX2 / AVX-VNNI kernels' control table (layout 5), without a pair-safe section");
  m.def(
      "s24i8_packing_parts",
      [](uintptr_t packed, int64_t nbytes, int64_t n, int64_t k) {
        if (const char* err = sparse24_int8::check_packed(ptr<const uint8_t>(packed), nbytes, n, k))
          throw py::value_error(std::string("packed: ") + err);
        sparse24_int8::PackedHeader h;
        std::memcpy(&h, ptr<const uint8_t>(packed), sizeof(h));
        return py::make_tuple(h.layout == sparse24_int8::kLayoutP32Q4Ctrl, h.ps_offset != 0);
      },
      "(control table, pair-safe section): which optional parts (the AVX2 / AVX-VNNI kernels') a valid 2:4 int8 packing has",
      py::arg("packed"), py::arg("nbytes"), py::arg("n"), py::arg("k"));
  m.def(
      "s24i8_packed_nbytes_for",
      [](uintptr_t values, int64_t ldv, uintptr_t pos, int64_t ldp, int64_t n, int64_t k) {
        return sparse24_int8::packed_nbytes_for(ptr<const int8_t>(values), ldv, ptr<const uint8_t>(pos), ldp, n, k);
      },
      "bytes of the 2:4 int8 packing for the selected kernel: with a pair-safe section where the AVX2 kernel "
      "runs and the values qualify (sparse24_int8.h)",
      py::arg("values"), py::arg("ldv"), py::arg("pos"), py::arg("ldp"), py::arg("n"), py::arg("k"));
  m.def(
      "s24i8_pack",
      [](uintptr_t values, int64_t ldv, uintptr_t pos, int64_t ldp, int64_t n, int64_t k, uintptr_t out,
         int64_t out_nbytes) {
        // out_nbytes: s24i8_packed_nbytes, that plus the control table (s24i8_packed_nbytes_ctrl), or
        // plus the table and a pair-safe section (s24i8_packed_nbytes_for's size where it adds one)
        if (out_nbytes != sparse24_int8::packed_nbytes(n, k) && out_nbytes != sparse24_int8::packed_nbytes_ctrl(n, k) &&
            out_nbytes != sparse24_int8::packed_nbytes_ps(ptr<const int8_t>(values), ldv, n, k))
          throw py::value_error("out: wrong size for the packed 2:4 int8 weight");
        py::gil_scoped_release nogil;
        sparse24_int8::pack(ptr<const int8_t>(values), ldv, ptr<const uint8_t>(pos), ldp, n, k, ptr<uint8_t>(out),
                            out_nbytes);
      },
      py::arg("values"), py::arg("ldv"), py::arg("pos"), py::arg("ldp"), py::arg("n"), py::arg("k"),
      py::arg("out"), py::arg("out_nbytes"));
  m.def("int8_packed_nbytes", &int8_gemm::packed_nbytes, py::arg("n"), py::arg("k"));
  m.def(
      "pair_safe_levels",
      [] {
        return py::make_tuple(int8_gemm::wants_pair_safe(), sparse24_int8::wanted_parts(),
                              int8_gemm::wants_quad_safe());
      },
      "(int8, sparse24_int8, int8 7-bit): whether the level in use reads pair-safe sections, which parts the 2:4 "
      "int8 packers add (0 none, 1 the control table, 2 the table and a pair-safe section), and whether the 7-bit "
      "level reads quad-safe sections: the modules repack when theirs changes");
  m.def(
      "int8_packed_nbytes_for",
      [](uintptr_t w, int64_t ldw, int64_t n, int64_t k, int act_bits) {
        if (act_bits != 8 && act_bits != 7) throw py::value_error("act_bits: expected 8 or 7");
        return int8_gemm::packed_nbytes_for(ptr<const int8_t>(w), ldw, n, k, act_bits);
      },
      "bytes of the packing of int8 w [n, k] (row stride ldw) for the selected act_bits kernel: with a pair-safe "
      "(8) or quad-safe (7) section where the AVX2 kernel runs and w qualifies (int8_gemm.h, PsHeader)",
      py::arg("w"), py::arg("ldw"), py::arg("n"), py::arg("k"), py::arg("act_bits") = 8);
  m.def("bsr_kernel_name", [] { return std::string(block_sparse::select_kernel().name); });
  m.def("bsr_int8_kernel_name", [] { return std::string(block_sparse::select_kernel_int8().name); });
  m.def("bsr_int8_packed_nbytes", &block_sparse::packed_nbytes_int8, py::arg("n"), py::arg("k"), py::arg("bh"),
        py::arg("bw"), py::arg("nnzb"));
  m.def(
      "bsr_int8_pack",
      [](uintptr_t values, uintptr_t crow, uintptr_t col, int64_t n, int64_t k, int bh, int bw, int64_t nnzb,
         uintptr_t out, int64_t out_nbytes) {
        if (bh < 1 || bw < 1 || n < 1 || k < 1 || nnzb < 0) throw py::value_error("bsr_int8_pack: bad shape");
        if (out_nbytes != block_sparse::packed_nbytes_int8(n, k, bh, bw, nnzb))
          throw py::value_error("out: wrong size for the packed BSR int8 weight");
        const std::string err = bsr_index_error(ptr<const int32_t>(crow), ptr<const int32_t>(col), n, k, bh, bw, nnzb);
        if (!err.empty()) throw py::value_error(err);
        {  // -128 has no negation in int8: the kernels' sign tricks and compensations assume [-127, 127]
          const int8_t* v = ptr<const int8_t>(values);
          const int32_t* cr = ptr<const int32_t>(crow);
          const int32_t* cl = ptr<const int32_t>(col);
          for (int64_t r = 0; r < (n + bh - 1) / bh; ++r)
            for (int64_t b = cr[r]; b < cr[r + 1]; ++b)
              for (int i = 0; i < bh && r * bh + i < n; ++i)
                for (int j = 0; j < bw && int64_t(cl[b]) * bw + j < k; ++j)
                  if (v[(b * bh + i) * bw + j] == -128)
                    throw py::value_error("values: int8 weights must be in [-127, 127]; block " + std::to_string(b) +
                                          " (block row " + std::to_string(r) + ", block column " +
                                          std::to_string(cl[b]) + ") holds -128");
        }
        py::gil_scoped_release nogil;
        block_sparse::pack_int8(ptr<const int8_t>(values), ptr<const int32_t>(crow), ptr<const int32_t>(col), n, k,
                                bh, bw, nnzb, ptr<uint8_t>(out));
      },
      "pack validated canonical BSR int8 blocks (values [nnzb, bh, bw] in [-127, 127], int32 crow/col)",
      py::arg("values"), py::arg("crow"), py::arg("col"), py::arg("n"), py::arg("k"), py::arg("bh"), py::arg("bw"),
      py::arg("nnzb"), py::arg("out"), py::arg("out_nbytes"));
  def_bsr_check(m, "bsr_int8_check_packed", &block_sparse::packing_error_int8,
                "'' when `packed` (nbytes) is the BSR int8 packing of an [n, k] weight of nnzb bh x bw blocks in the "
                "pattern crow [ceil(n / bh) + 1] / col [nnzb] (int32 pointers), else what the call expected and what "
                "the buffer holds; reads the header, row pointers and column entries (O(n / bh + nnzb)), not the "
                "values");
  m.def("bsr_packed_nbytes", &block_sparse::packed_nbytes, py::arg("n"), py::arg("k"), py::arg("bh"), py::arg("bw"),
        py::arg("nnzb"));
  m.def(
      "bsr_pack",
      [](uintptr_t values, uintptr_t crow, uintptr_t col, int64_t n, int64_t k, int bh, int bw, int64_t nnzb,
         uintptr_t out, int64_t out_nbytes) {
        if (bh < 1 || bw < 1 || n < 1 || k < 1 || nnzb < 0) throw py::value_error("bsr_pack: bad shape");
        if (out_nbytes != block_sparse::packed_nbytes(n, k, bh, bw, nnzb))
          throw py::value_error("out: wrong size for the packed BSR weight");
        const std::string err = bsr_index_error(ptr<const int32_t>(crow), ptr<const int32_t>(col), n, k, bh, bw, nnzb);
        if (!err.empty()) throw py::value_error(err);
        py::gil_scoped_release nogil;
        block_sparse::pack(ptr<const float>(values), ptr<const int32_t>(crow), ptr<const int32_t>(col), n, k, bh, bw,
                           nnzb, ptr<uint8_t>(out));
      },
      "pack validated canonical BSR fp32 blocks (values [nnzb, bh, bw], int32 crow/col) for the native kernels",
      py::arg("values"), py::arg("crow"), py::arg("col"), py::arg("n"), py::arg("k"), py::arg("bh"), py::arg("bw"),
      py::arg("nnzb"), py::arg("out"), py::arg("out_nbytes"));
  def_bsr_check(m, "bsr_check_packed", &block_sparse::packing_error,
                "'' when `packed` (nbytes) is the BSR fp32 packing of an [n, k] weight of nnzb bh x bw blocks in the "
                "pattern crow [ceil(n / bh) + 1] / col [nnzb] (int32 pointers), else what the call expected and what "
                "the buffer holds; reads the header, row pointers and column entries (O(n / bh + nnzb)), not the "
                "values");
  m.def(
      "int8_pack",
      [](uintptr_t w, int64_t ldw, int64_t n, int64_t k, uintptr_t out, int64_t out_nbytes, int act_bits) {
        if (act_bits != 8 && act_bits != 7) throw py::value_error("act_bits: expected 8 or 7");
        // out_nbytes: int8_packed_nbytes, or int8_packed_nbytes_for where it adds the section act_bits'
        // AVX2 path reads (pair-safe for 8, quad-safe for 7)
        const bool with_ps = out_nbytes != int8_gemm::packed_nbytes(n, k);
        if (with_ps && out_nbytes != int8_gemm::packed_nbytes_ps(ptr<const int8_t>(w), ldw, n, k, act_bits))
          throw py::value_error("out: wrong size for the packed weight");
        py::gil_scoped_release nogil;
        int8_gemm::pack_weights(ptr<const int8_t>(w), ldw, n, k, ptr<uint8_t>(out), with_ps, act_bits);
      },
      py::arg("w"), py::arg("ldw"), py::arg("n"), py::arg("k"), py::arg("out"),
      py::arg("out_nbytes"), py::arg("act_bits") = 8);
  m.def(
      "int8_check_packed",
      [](uintptr_t packed, int64_t nbytes, int64_t n, int64_t k) -> py::object {
        if (const char* e = int8_gemm::check_packed(ptr<const uint8_t>(packed), nbytes, n, k))
          return py::str(e);
        return py::none();
      },
      py::arg("packed"), py::arg("nbytes"), py::arg("n"), py::arg("k"));
  m.def(
      "int8_gemm_prequantized",
      [](uintptr_t q, int64_t ldq, uintptr_t q_scale, int64_t m, int64_t k, uintptr_t packed,
         int64_t packed_nbytes, int64_t n, uintptr_t w_scale, uintptr_t bias, uintptr_t y,
         int64_t ldy, bool y_bf16, int nthreads) {
        check_packed_or_throw(packed, packed_nbytes, n, k);
        py::gil_scoped_release nogil;
        int8_gemm::gemm_prequantized(ptr<const int8_t>(q), ldq, ptr<const float>(q_scale), m, k,
                                     ptr<const uint8_t>(packed), ptr<const float>(w_scale),
                                     bias ? ptr<const float>(bias) : nullptr, ptr<void>(y), ldy,
                                     y_bf16, nthreads);
      },
      py::arg("q"), py::arg("ldq"), py::arg("q_scale"), py::arg("m"), py::arg("k"),
      py::arg("packed"), py::arg("packed_nbytes"), py::arg("n"), py::arg("w_scale"),
      py::arg("bias"), py::arg("y"), py::arg("ldy"), py::arg("y_bf16"), py::arg("nthreads"));
  m.def(
      "quantize_rows",
      [](uintptr_t x, int64_t ldx, bool x_bf16, int64_t m, int64_t k, uintptr_t q, int64_t ldq,
         uintptr_t scale, int nthreads, int qmax) {
        if (qmax != int8_gemm::kQmax8 && qmax != int8_gemm::kQmax7)
          throw py::value_error("qmax: expected 127 or 63, got " + std::to_string(qmax));
        py::gil_scoped_release nogil;
        int8_gemm::quantize_rows(ptr<const void>(x), ldx, x_bf16, m, k, ptr<int8_t>(q), ldq,
                                 ptr<float>(scale), nthreads, qmax);
      },
      py::arg("x"), py::arg("ldx"), py::arg("x_bf16"), py::arg("m"), py::arg("k"), py::arg("q"),
      py::arg("ldq"), py::arg("scale"), py::arg("nthreads"), py::arg("qmax") = 127);
}
