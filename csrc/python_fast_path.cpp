// `dlopt_kernels._C.collect_group`: the per-step list building of an optimizer
// (FusedOptimizer._collect in dlopt_kernels/optim/_base.py) done in C.
//
// Why: for 1,000 small params the Python loop over a param group (read .grad, look
// up the state dict, append to six lists) cost about as much as the fused kernel
// moving their 70 MB (benchmarks/bench_optim_adam.py, tiny_1000: the `dlopt[cpu]` row
// against `kernel only`). This does the same walk at C speed for the common case and
// answers None for anything else (a param with no state yet, mixed devices or
// dtypes, sparse or mismatched grads, tensor subclasses such as DTensor or
// FakeTensor, a missing state key), and the Python path then does the work, with
// its checks and error messages. So this function never raises for bad input and
// never changes anything: it only reads.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dlopt/python_fast_path.h"

namespace dlopt {
namespace {

// Owns a new reference; releases it on scope exit.
struct Ref {
  PyObject* o;
  explicit Ref(PyObject* p = nullptr) : o(p) {}
  ~Ref() { Py_XDECREF(o); }
  Ref(Ref&& r) noexcept : o(r.release()) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  PyObject* release() {
    PyObject* p = o;
    o = nullptr;
    return p;
  }
};

// A Tensor or a Parameter, not a subclass with its own dispatch (DTensor, FakeTensor).
inline bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }

PyObject* none() { Py_RETURN_NONE; }

// `state[p]` (a borrowed reference, or nullptr) for a plain tensor `p`, without calling
// Tensor.__hash__ where `address_hash`: that is a Python function (torch/_tensor.py),
// called per param (with the direct grad read below, this walk's `collect` row in
// tools/step_host_time.py fell from 31-35 to 11 us for 148 params). It returns id(self),
// and an int below 2^61 - 1 hashes to itself, so the hash is the object's address;
// collect_group checks that on its first param before relying on it. A wrong hash could
// only miss (a hit needs the very same key object), and a miss sends the group to the
// Python path. The known-hash lookup is CPython's; newer versions take the plain path.
PyObject* state_of(PyObject* state, PyObject* p, bool address_hash) {
#if PY_VERSION_HEX < 0x030D0000
  if (address_hash) {
    const auto hash = static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(p));
    return _PyDict_GetItem_KnownHash(state, p, hash);
  }
#else
  (void)address_hash;
#endif
  return PyDict_GetItemWithError(state, p);
}

// Whether p's hash is its address (see state_of).
bool hash_is_address(PyObject* p) {
  const Py_hash_t h = PyObject_Hash(p);
  if (h == -1) {
    PyErr_Clear();
    return false;
  }
  return h == static_cast<Py_hash_t>(reinterpret_cast<uintptr_t>(p));
}

// collect_group(params: list, state: dict, keys: tuple[str, ...], master_key: str | None)
//   -> None | list[list[Tensor]]
// The result is [params, grads, *states in `keys` order, masters] for the params of
// `params` that have a grad, all plain dense tensors of one device and dtype whose
// grads match that dtype and device; `masters` is the `master_key` state of each
// (an empty list when master_key is None or the dtype is float32).
PyObject* collect_group(PyObject*, PyObject* args) {
  PyObject *params, *state, *keys, *master_key;
  if (!PyArg_ParseTuple(args, "O!O!O!O", &PyList_Type, &params, &PyDict_Type, &state,
                        &PyTuple_Type, &keys, &master_key))
    return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const Py_ssize_t nk = PyTuple_GET_SIZE(keys);
  Ref out_params(PyList_New(0)), out_grads(PyList_New(0)), out_masters(PyList_New(0));
  std::vector<Ref> out_states;
  for (Py_ssize_t k = 0; k < nk; ++k) out_states.emplace_back(PyList_New(0));

  bool first = true, use_master = false;
  const bool address_hash = n > 0 && hash_is_address(PyList_GET_ITEM(params, 0));
  c10::Device device(c10::kCPU);
  c10::ScalarType dtype = c10::ScalarType::Float;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    if (!plain_tensor(p)) return none();
    const at::Tensor& pt = THPVariable_Unpack(p);
    // p.grad as its getter reads it (THPVariable_get_grad), without the attribute lookup
    const at::Tensor& grad = pt.grad();
    if (!grad.defined()) continue;
    Ref g(THPVariable_Wrap(grad));
    if (!g.o) return nullptr;
    if (!plain_tensor(g.o)) return none();
    const at::Tensor& gt = THPVariable_Unpack(g.o);
    if (first) {
      device = pt.device();
      dtype = pt.scalar_type();
      if (dtype != c10::ScalarType::Float && dtype != c10::ScalarType::BFloat16 &&
          dtype != c10::ScalarType::Half && dtype != c10::ScalarType::Double)
        return none();
      // master copies are kept for bf16 / fp16 params only
      use_master = master_key != Py_None && (dtype == c10::ScalarType::BFloat16 ||
                                             dtype == c10::ScalarType::Half);
      first = false;
    } else if (pt.device() != device || pt.scalar_type() != dtype) {
      return none();
    }
    if (gt.layout() != c10::kStrided || gt.scalar_type() != dtype || gt.device() != device)
      return none();
    if (PyList_Append(out_params.o, p) || PyList_Append(out_grads.o, g.o)) return nullptr;
    if (nk == 0 && !use_master) continue;  // e.g. SGD without momentum keeps no state
    // Borrowed references below; the dict and the state dicts outlive this call.
    PyObject* st = state_of(state, p, address_hash);  // no defaultdict insertion
    if (!st || !PyDict_Check(st)) {
      PyErr_Clear();
      return none();
    }
    for (Py_ssize_t k = 0; k < nk; ++k) {
      PyObject* t = PyDict_GetItemWithError(st, PyTuple_GET_ITEM(keys, k));
      if (!t || !plain_tensor(t)) {
        PyErr_Clear();
        return none();
      }
      if (PyList_Append(out_states[k].o, t)) return nullptr;
    }
    if (use_master) {
      PyObject* m = PyDict_GetItemWithError(st, master_key);
      if (!m || !plain_tensor(m)) {
        PyErr_Clear();
        return none();
      }
      if (PyList_Append(out_masters.o, m)) return nullptr;
    }
  }
  if (first) return none();  // no param has a grad: nothing to gain here
  Ref result(PyList_New(3 + nk));
  if (!result.o) return nullptr;
  PyList_SET_ITEM(result.o, 0, out_params.release());
  PyList_SET_ITEM(result.o, 1, out_grads.release());
  for (Py_ssize_t k = 0; k < nk; ++k) PyList_SET_ITEM(result.o, 2 + k, out_states[k].release());
  PyList_SET_ITEM(result.o, 2 + nk, out_masters.release());
  return result.release();
}

// ---------------------------------------------------------------- call_compiled
// Python arguments as the C++ types of a kernel's signature, the tensors *borrowed*
// from their Python objects (no refcount change). Why borrowed: a C++ reference to a
// tensor that Python owns costs a Py_INCREF/Py_DECREF pair under the GIL (torch's
// PyObject preservation; perf showed the GIL and refcount calls), and the boxed op
// call makes two such references per tensor.
using Borrow = c10::MaybeOwnedTraits<at::Tensor>;

struct ArgError {};  // a Python exception is set

at::Tensor borrow_tensor(PyObject* obj) {
  if (!THPVariable_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "call_compiled: expected a tensor");
    throw ArgError{};
  }
  return Borrow::createBorrow(THPVariable_Unpack(obj));
}

// Each holder is built in place and never copied: a copy of a borrowed tensor would
// take a real reference that destroyBorrow then never gives back.
struct NoCopy {
  NoCopy() = default;
  NoCopy(const NoCopy&) = delete;
  NoCopy& operator=(const NoCopy&) = delete;
};

template <class T>
struct Arg;

template <>
struct Arg<at::TensorList> : NoCopy {
  std::vector<at::Tensor> v;
  explicit Arg(PyObject* obj) {
    if (!PyList_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "call_compiled: expected a list of tensors");
      throw ArgError{};
    }
    const Py_ssize_t n = PyList_GET_SIZE(obj);
    // Check every item before borrowing any: a throw half-way would leave borrowed
    // tensors in `v` for the vector's own destructor to release as if owned.
    for (Py_ssize_t k = 0; k < n; ++k) {
      if (!THPVariable_Check(PyList_GET_ITEM(obj, k))) {
        PyErr_SetString(PyExc_TypeError, "call_compiled: expected a list of tensors");
        throw ArgError{};
      }
    }
    v.reserve(n);
    for (Py_ssize_t k = 0; k < n; ++k)
      v.push_back(Borrow::createBorrow(THPVariable_Unpack(PyList_GET_ITEM(obj, k))));
  }
  ~Arg() {
    for (auto& t : v) Borrow::destroyBorrow(t);
  }
  at::TensorList get() const { return v; }
};

template <>
struct Arg<const at::Tensor&> : NoCopy {
  at::Tensor t;
  explicit Arg(PyObject* obj) : t(borrow_tensor(obj)) {}
  ~Arg() { Borrow::destroyBorrow(t); }
  const at::Tensor& get() const { return t; }
};

template <>
struct Arg<const std::optional<at::Tensor>&> : NoCopy {
  std::optional<at::Tensor> t;
  explicit Arg(PyObject* obj) {
    if (obj != Py_None) t = borrow_tensor(obj);
  }
  ~Arg() {
    if (t) Borrow::destroyBorrow(*t);
  }
  const std::optional<at::Tensor>& get() const { return t; }
};

template <>
struct Arg<double> : NoCopy {
  double x;
  explicit Arg(PyObject* obj) : x(0.0) {
    if (!PyFloat_Check(obj) && !PyLong_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "call_compiled: expected a float");
      throw ArgError{};
    }
    x = PyFloat_AsDouble(obj);
    if (x == -1.0 && PyErr_Occurred()) throw ArgError{};
  }
  double get() const { return x; }
};

template <>
struct Arg<bool> : NoCopy {
  bool b;
  explicit Arg(PyObject* obj) : b(obj == Py_True) {
    if (!PyBool_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "call_compiled: expected a bool");
      throw ArgError{};
    }
  }
  bool get() const { return b; }
};

template <>
struct Arg<c10::List<bool>> : NoCopy {
  c10::List<bool> l;
  explicit Arg(PyObject* obj) {
    if (!PyList_Check(obj)) {
      PyErr_SetString(PyExc_TypeError, "call_compiled: expected a list of bools");
      throw ArgError{};
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(obj); ++k) l.push_back(Arg<bool>(PyList_GET_ITEM(obj, k)).get());
  }
  c10::List<bool> get() const { return l; }
};

// Calls `dlopt_C::<name>` (typed as Sig) with the Python tuple `args`; the dispatcher
// picks the CPU or CUDA kernel as for any call. The GIL stays held: the kernels need
// no Python, and releasing it would make every refcount change above take it again.
template <class Sig>
struct Caller;

template <class... A>
struct Caller<void(A...)> {
  static PyObject* call(const char* name, PyObject* args) {
    constexpr size_t n = sizeof...(A);
    if (static_cast<size_t>(PyTuple_GET_SIZE(args)) != n + 1) {
      PyErr_Format(PyExc_TypeError, "call_compiled: %s takes %zu arguments, got %zd", name,
                   n, PyTuple_GET_SIZE(args) - 1);
      return nullptr;
    }
    // keyed by name: two ops may share a signature (Adagrad's and Lion's do)
    static std::unordered_map<std::string, c10::TypedOperatorHandle<void(A...)>> ops;
    auto it = ops.find(name);
    if (it == ops.end())
      it = ops.emplace(name, c10::Dispatcher::singleton()
                                 .findSchemaOrThrow((std::string("dlopt_C::") + name).c_str(), "")
                                 .typed<void(A...)>())
               .first;
    return run(it->second, args, std::index_sequence_for<A...>{});
  }

  template <size_t... I>
  static PyObject* run(const c10::TypedOperatorHandle<void(A...)>& op, PyObject* args,
                       std::index_sequence<I...>) {
    try {
      // each built in place from its PyObject, destroyed (un-borrowed) on any exit
      std::tuple<Arg<A>...> held(PyTuple_GET_ITEM(args, I + 1)...);
      op.call(std::get<I>(held).get()...);
    } catch (const ArgError&) {
      return nullptr;
    }
    Py_RETURN_NONE;
  }
};

using TL = at::TensorList;
using T = const at::Tensor&;
using OT = const std::optional<at::Tensor>&;
// The compiled ops' signatures (their schemas: csrc/cpu/<op>.cpp); typed() checks each
// against its schema when first used.
using AdamSig = void(TL, TL, TL, TL, TL, TL, TL, T, double, double, double, double, bool,
                     bool, bool, OT, OT, OT);
using SgdSig = void(TL, TL, TL, TL, T, double, double, double, bool, bool, c10::List<bool>,
                    OT, OT, OT);
using AdagradSig = void(TL, TL, TL, TL, TL, T, double, double, double, bool, OT, OT, OT);
using RmspropSig = void(TL, TL, TL, TL, TL, TL, TL, T, double, double, double, double, bool,
                        bool, OT, OT, OT);
using AdafactorSig = void(TL, TL, TL, TL, TL, TL, TL, T, double, double, double, double,
                          double, bool, OT, OT, OT);
using LionSig = void(TL, TL, TL, TL, TL, T, double, double, double, bool, OT, OT, OT);
using LambSig = void(TL, TL, TL, TL, TL, TL, T, double, double, double, double, bool, double,
                     OT, OT, OT, OT);

// call_compiled(name, *args) -> None: `torch.ops.dlopt_C.<name>(*args)` for the
// optimizer steps, without the Python op call's per-tensor argument conversion and
// refcounting, which for many small params was most of a step's cost outside the
// kernel (benchmarks/bench_optim_adam.py, tiny_1000 rows). Wrong argument types raise
// TypeError.
PyObject* call_compiled(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  if (PyTuple_GET_SIZE(args) < 1 || !PyUnicode_Check(PyTuple_GET_ITEM(args, 0))) {
    PyErr_SetString(PyExc_TypeError, "call_compiled(name, *args): name must be a str");
    return nullptr;
  }
  const std::string name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(args, 0));
  if (name == "adam_step") return Caller<AdamSig>::call("adam_step", args);
  if (name == "sgd_step") return Caller<SgdSig>::call("sgd_step", args);
  if (name == "adagrad_step") return Caller<AdagradSig>::call("adagrad_step", args);
  if (name == "rmsprop_step") return Caller<RmspropSig>::call("rmsprop_step", args);
  if (name == "adafactor_step") return Caller<AdafactorSig>::call("adafactor_step", args);
  if (name == "lion_step") return Caller<LionSig>::call("lion_step", args);
  if (name == "lamb_step") return Caller<LambSig>::call("lamb_step", args);
  PyErr_Format(PyExc_ValueError, "call_compiled: unknown op %s", name.c_str());
  return nullptr;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"call_compiled", call_compiled, METH_VARARGS,
     "call_compiled(name, *args) -> None: torch.ops.dlopt_C.<name>(*args) for an op that "
     "returns nothing, without the Python op call's per-tensor argument conversion "
     "(see csrc/python_fast_path.cpp)."},
    {"collect_group", collect_group, METH_VARARGS,
     "collect_group(params, state, keys, master_key) -> None | list of lists: the tensors "
     "an optimizer step of one param group hands to its fused op, or None when the "
     "Python path must handle the group (see csrc/python_fast_path.cpp)."},
    {"triton_tables", triton_tables, METH_VARARGS,
     "triton_tables(lists, key_lists, extra, chunk) -> None | (contiguous, groups): the "
     "tables of a Triton multi-tensor launch (see csrc/python_lists.cpp)."},
    {"on_device", on_device, METH_VARARGS,
     "on_device(tensors, ref) -> None | bool: whether every tensor of the list is on ref's "
     "device (see csrc/python_lists.cpp)."},
    {"elementwise_lists_ok", elementwise_lists_ok, METH_VARARGS,
     "elementwise_lists_ok(params, grads, states, masters, steps, use_sr) -> None | bool: "
     "whether the Python element-wise list checks pass (see csrc/python_lists.cpp)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* fast_path_methods() { return kMethods; }

}  // namespace dlopt
