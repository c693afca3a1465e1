// Two helpers of `dlopt_kernels._C` over lists of tensors, done in C because in Python
// each walks every tensor of every list, and a Triton step's host time is mostly such
// walks: on an H100 the Triton Adam step over 1,000 small tensors took 6.8 ms called
// from Python and 0.08 ms replayed from a CUDA graph (tools/triton_sizes.py,
// benchmarks/results/nvidia-h100-80gb-hbm3-2026-11-26-triton-sizes.json).
//
// `triton_tables`: the host half of the Triton element-wise launches
// (dlopt_kernels/triton/_common.py multi_tensor_groups stays as the fallback and the
// reference).
// `elementwise_lists_ok`: the verdict of dlopt_kernels/backends/checks.py's list checks
// (shapes, devices, dtypes), which the Triton and reference steps run first.
//
// `on_device`: whether a list's tensors (the step counts) all sit on one tensor's device.
//
// Like collect_group (python_fast_path.cpp), none of them raises for unusual input nor
// changes anything: each answers None (plain Python then does the work, with its error
// messages) for anything but plain tensors in lists of the params' length.
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

namespace dlopt {
namespace {

bool same_list_length(PyObject* lst, Py_ssize_t n, bool may_be_empty) {
  const Py_ssize_t len = PyList_GET_SIZE(lst);
  return len == n || (may_be_empty && len == 0);
}

bool all_plain(PyObject* lst) {
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lst); ++i)
    if (!THPVariable_CheckExact(PyList_GET_ITEM(lst, i))) return false;
  return true;
}

const at::Tensor& tensor_at(PyObject* lst, Py_ssize_t i) {
  return THPVariable_Unpack(PyList_GET_ITEM(lst, i));
}

bool param_dtype(c10::ScalarType t) {
  return t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 ||
         t == c10::ScalarType::Half;
}

}  // namespace

// elementwise_lists_ok(params, grads, states, masters, steps, use_sr) -> None | bool
// The verdict of dlopt_kernels/backends/checks.py _elementwise_lists_ok (the Python twin
// and the reference) at C speed: True when check_elementwise_lists has nothing to say.
// `states` is a list of per-param lists; `masters` and `steps` may be empty. None for
// anything but plain tensors in lists of the params' length (the Python path decides).
PyObject* elementwise_lists_ok(PyObject*, PyObject* args) {
  PyObject *params, *grads, *states, *masters, *steps;
  int use_sr;
  if (!PyArg_ParseTuple(args, "O!O!O!O!O!p", &PyList_Type, &params, &PyList_Type, &grads,
                        &PyList_Type, &states, &PyList_Type, &masters, &PyList_Type, &steps,
                        &use_sr))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  std::vector<PyObject*> state_lists;
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(states); ++k) {
    PyObject* s = PyList_GET_ITEM(states, k);
    if (!PyList_Check(s) || !same_list_length(s, n, false) || !all_plain(s)) return none();
    state_lists.push_back(s);
  }
  if (!same_list_length(grads, n, false) || !same_list_length(masters, n, true) ||
      !same_list_length(steps, n, true) || !all_plain(params) || !all_plain(grads) ||
      !all_plain(masters) || !all_plain(steps))
    return none();
  const bool has_masters = PyList_GET_SIZE(masters) != 0;
  const bool has_steps = PyList_GET_SIZE(steps) != 0;
  bool ok = true;
  try {
    const c10::Device device = n ? tensor_at(params, 0).device() : c10::Device(c10::kCPU);
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
      const at::Tensor& p = tensor_at(params, i);
      const c10::ScalarType pt = p.scalar_type();
      ok = p.device() == device && param_dtype(pt) && !(use_sr && pt == c10::ScalarType::Half);
      const auto like_p = [&](const at::Tensor& t) {
        return t.device() == device && t.sizes() == p.sizes();
      };
      const at::Tensor& g = tensor_at(grads, i);
      ok = ok && like_p(g) && g.scalar_type() == pt;
      bool any_state = false;
      c10::ScalarType st = c10::ScalarType::Float;
      for (PyObject* lst : state_lists) {
        const at::Tensor& s = tensor_at(lst, i);
        if (!any_state) st = s.scalar_type();
        ok = ok && like_p(s) && s.scalar_type() == st &&
             (st == c10::ScalarType::Float || st == pt);
        any_state = true;
      }
      if (has_masters) {
        const at::Tensor& m = tensor_at(masters, i);
        ok = ok && like_p(m) && m.scalar_type() == c10::ScalarType::Float &&
             (!any_state || st == c10::ScalarType::Float);
      }
      if (has_steps) {
        const at::Tensor& s = tensor_at(steps, i);
        ok = ok && s.numel() == 1 && s.is_floating_point();
      }
    }
  } catch (const c10::Error&) {
    return none();  // e.g. symbolic sizes: the Python path decides
  }
  return PyBool_FromLong(ok);
}

// on_device(tensors, ref) -> None | bool
// Whether every tensor of the list is on ref's device (Triton's count_steps asks it of
// the step counts every step, where a Python walk read each tensor's device object).
// None for anything but plain tensors.
PyObject* on_device(PyObject*, PyObject* args) {
  PyObject *tensors, *ref;
  if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &tensors, &ref)) return nullptr;
  if (!THPVariable_CheckExact(ref) || !all_plain(tensors)) return none();
  const c10::Device device = THPVariable_Unpack(ref).device();
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i)
    if (tensor_at(tensors, i).device() != device) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
}

}  // namespace dlopt
