// `dlopt_kernels._C.triton_tables`: the host half of the Triton element-wise launches
// (dlopt_kernels/triton/_common.py multi_tensor_groups, which stays as the fallback
// and the reference) done in C.
//
// Why: a Triton step's own work on the host is a walk over every tensor of every list
// (its address, size, dtype, alignment, layout). In Python that walk cost about 10 us
// a tensor: 1,000 small params spent several milliseconds there, more than the kernel
// (benchmarks/bench_optim_adam.py, tiny_1000 on an H100). Like collect_group, this
// never raises for unusual input and changes nothing: it answers None (plain Python
// then does the work, with its error messages) for anything but plain tensors of the
// four float dtypes in lists of the params' length.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <vector>

#include "dlopt/python_fast_path.h"

namespace dlopt {
namespace {

// _common.py CODE_DTYPES: the order of the codes a group's key holds.
int dtype_code(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return 0;
    case c10::ScalarType::Double: return 1;
    case c10::ScalarType::BFloat16: return 2;
    case c10::ScalarType::Half: return 3;
    default: return -1;
  }
}

struct Group {
  std::vector<int64_t> key;
  bool aligned;
  std::vector<int64_t> rows;  // per tensor: numel, index, first program, addresses
  std::vector<int32_t> map;   // per program: its row
  int64_t programs = 0;
};

PyObject* none() { Py_RETURN_NONE; }

PyObject* bytes_of(const void* data, size_t n) {
  return PyBytes_FromStringAndSize(static_cast<const char*>(data), static_cast<Py_ssize_t>(n));
}

}  // namespace

// triton_tables(lists, key_lists, extra, chunk) -> None | (contiguous, groups)
//   lists: list of lists of tensors, params first; an empty list stands in as the params.
//   key_lists: tuple of list indices whose dtypes (as codes) key a group.
//   extra: None or a list of ints, one per param, appended to its key.
//   chunk: elements per program.
// groups: [(key, aligned, table, block_map, programs)] in order of first appearance,
// over the params with elements: `table` the int64 rows of _common.multi_tensor_groups
// (numel, index, first program, one address per list), `block_map` each program's row
// as int32, both as bytes. `aligned` is _common.vector_ready. `contiguous`: every
// tensor with its param's numel is contiguous (no scratch copies needed).
PyObject* triton_tables(PyObject*, PyObject* args) {
  PyObject *lists, *key_lists, *extra;
  long long chunk;
  if (!PyArg_ParseTuple(args, "O!O!OL", &PyList_Type, &lists, &PyTuple_Type, &key_lists,
                        &extra, &chunk))
    return nullptr;
  if (chunk <= 0) {
    PyErr_SetString(PyExc_ValueError, "triton_tables: chunk must be positive");
    return nullptr;
  }
  const Py_ssize_t nl = PyList_GET_SIZE(lists);
  if (nl < 1 || !PyList_Check(PyList_GET_ITEM(lists, 0))) return none();
  PyObject* params = PyList_GET_ITEM(lists, 0);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  std::vector<PyObject*> cols(nl);
  for (Py_ssize_t k = 0; k < nl; ++k) {
    PyObject* lst = PyList_GET_ITEM(lists, k);
    if (!PyList_Check(lst)) return none();
    const Py_ssize_t len = PyList_GET_SIZE(lst);
    if (len != 0 && len != n) return none();
    cols[k] = len == 0 ? params : lst;
  }
  std::vector<Py_ssize_t> keys;
  for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(key_lists); ++j) {
    const long k = PyLong_AsLong(PyTuple_GET_ITEM(key_lists, j));
    if (k == -1 && PyErr_Occurred()) return nullptr;
    if (k < 0 || k >= nl) return none();
    keys.push_back(k);
  }
  const bool has_extra = extra != Py_None;
  if (has_extra && (!PyList_Check(extra) || PyList_GET_SIZE(extra) != n)) return none();
  // Every item is a plain tensor before any is read.
  for (Py_ssize_t k = 0; k < nl; ++k)
    for (Py_ssize_t i = 0; i < n; ++i)
      if (!THPVariable_CheckExact(PyList_GET_ITEM(cols[k], i))) return none();

  std::vector<Group> groups;
  std::vector<int64_t> row(3 + nl), key(keys.size() + (has_extra ? 1 : 0));
  bool contiguous = true;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      const at::Tensor& p = THPVariable_Unpack(PyList_GET_ITEM(params, i));
      const int64_t numel = p.numel();
      if (numel == 0) continue;
      bool aligned = numel % 8 == 0;
      row[0] = numel;
      row[1] = i;
      for (Py_ssize_t k = 0; k < nl; ++k) {
        const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(cols[k], i));
        if (t.layout() != c10::kStrided) return none();
        const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
        row[3 + k] = static_cast<int64_t>(addr);
        if (t.numel() == numel) {  // element-wise with the param (not a step count)
          aligned = aligned && addr % 16 == 0;
          contiguous = contiguous && t.is_contiguous();
        }
      }
      for (size_t j = 0; j < keys.size(); ++j) {
        const int code = dtype_code(THPVariable_Unpack(PyList_GET_ITEM(cols[keys[j]], i))
                                        .scalar_type());
        if (code < 0) return none();
        key[j] = code;
      }
      if (has_extra) {
        key.back() = PyLong_AsLongLong(PyList_GET_ITEM(extra, i));
        if (key.back() == -1 && PyErr_Occurred()) return nullptr;
      }
      Group* g = nullptr;
      for (auto& h : groups)
        if (h.aligned == aligned && h.key == key) g = &h;
      if (g == nullptr) {
        groups.push_back(Group{key, aligned, {}, {}, 0});
        g = &groups.back();
      }
      row[2] = g->programs;
      const auto row_index = static_cast<int32_t>(g->rows.size() / row.size());
      g->rows.insert(g->rows.end(), row.begin(), row.end());
      const int64_t programs = (numel + chunk - 1) / chunk;
      g->map.insert(g->map.end(), static_cast<size_t>(programs), row_index);
      g->programs += programs;
    }
  } catch (const c10::Error&) {
    return none();  // e.g. a tensor without storage: the Python path decides
  }

  PyObject* out = PyList_New(static_cast<Py_ssize_t>(groups.size()));
  if (!out) return nullptr;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& g = groups[gi];
    PyObject* key_t = PyTuple_New(static_cast<Py_ssize_t>(g.key.size()));
    if (key_t)
      for (size_t j = 0; j < g.key.size(); ++j)
        PyTuple_SET_ITEM(key_t, j, PyLong_FromLongLong(g.key[j]));
    PyObject* item = key_t ? Py_BuildValue(
                                 "(NON NL)", key_t, g.aligned ? Py_True : Py_False,
                                 bytes_of(g.rows.data(), g.rows.size() * sizeof(int64_t)),
                                 bytes_of(g.map.data(), g.map.size() * sizeof(int32_t)),
                                 static_cast<long long>(g.programs))
                           : nullptr;
    if (!item) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, gi, item);
  }
  return Py_BuildValue("(ON)", contiguous ? Py_True : Py_False, out);
}

}  // namespace dlopt
