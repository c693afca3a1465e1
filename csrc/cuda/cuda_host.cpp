// dlopt/cuda_host.h: the host half shared by every CUDA op, compiled by g++.
#include "dlopt/cuda_host.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace dlopt {
namespace cuda {
namespace {

// The params' device, after checking they share one CUDA device and are few enough
// for the kernels' int32 tensor indices (Adafactor indexes 2 n per-tensor sums).
c10::Device one_cuda_device(const char* op, at::TensorList tensors, const char* name) {
  TORCH_CHECK(!tensors.empty(), "dlopt::", op, " (cuda): no ", name);
  TORCH_CHECK(tensors.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max() / 2),
              "dlopt::", op, ": too many tensors");
  const c10::Device device = tensors[0].device();
  TORCH_CHECK(device.is_cuda(), "dlopt::", op, " (cuda): ", name, "[0] is on ", device);
  for (size_t i = 1; i < tensors.size(); ++i)
    TORCH_CHECK(tensors[i].device() == device, "dlopt::", op, " (cuda): all tensors must be on "
                "one CUDA device, but ", name, "[", i, "] is on ", tensors[i].device(), " and ",
                name, "[0] on ", device);
  return device;
}

// The kernels read one-element scalars of these dtypes (dlopt/cuda_scalar.cuh).
DType scalar_dtype(at::ScalarType st, const char* name) {
  switch (st) {
    case at::kLong: return DType::kI64;
    case at::kInt: return DType::kI32;
    case at::kBool:
    case at::kByte: return DType::kU8;
    case at::kFloat:
    case at::kDouble:
    case at::kHalf:
    case at::kBFloat16: return dtype_of(st);
    default: TORCH_CHECK(false, "dlopt: unsupported dtype ", st, " for ", name);
  }
}

}  // namespace

DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: TORCH_CHECK(false, "dlopt: unsupported dtype ", st);
  }
}

HostCall::HostCall(const char* op, at::TensorList tensors, const char* name)
    : tensors_(tensors), device_(one_cuda_device(op, tensors, name)), guard_(device_) {}

void HostCall::set_optimizer(at::TensorList state_steps, const at::Tensor& lr,
                             const std::optional<at::Tensor>& grad_scale,
                             const std::optional<at::Tensor>& found_inf,
                             const std::optional<at::Tensor>& sr_seed, bool use_master) {
  for (const at::Tensor& p : tensors_) {
    const auto pt = p.scalar_type();
    TORCH_CHECK_TYPE(pt == at::kFloat || pt == at::kBFloat16 || pt == at::kHalf,
                     "dlopt: unsupported param dtype ", pt, kDtypeHint);
  }
  steps_.reserve(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& s = state_steps[i];
    const auto st = s.scalar_type();
    TORCH_CHECK(s.numel() == 1 && s.device() == device_ && (st == at::kFloat || st == at::kDouble),
                "dlopt: state_steps[", i, "] must be a one-element float32/float64 tensor on ",
                device_);
    steps_.push_back({s.data_ptr(), st == at::kDouble});
  }
  launch_.lr = scalar(lr, "lr", 0.0);
  launch_.grad_scale = scalar(grad_scale, "grad_scale", 1.0);
  launch_.found_inf = scalar(found_inf, "found_inf", 0.0);
  launch_.seed = scalar(sr_seed, "sr_seed", 0.0, /*integral=*/true);
  launch_.store = use_master             ? StoreMode::kMaster
                  : sr_seed.has_value() ? StoreMode::kStochastic
                                        : StoreMode::kNearest;
}

ScalarRef HostCall::scalar(const std::optional<at::Tensor>& t, const char* name,
                           double default_value, bool integral) const {
  ScalarRef r;
  r.value = default_value;
  r.ivalue = static_cast<int64_t>(default_value);
  if (!t.has_value() || !t->defined()) return r;
  TORCH_CHECK(t->numel() == 1, "dlopt: ", name, " must have one element, got ", t->numel());
  if (t->device().is_cpu()) {
    r.value = t->item<double>();
    if (integral) r.ivalue = t->item<int64_t>();
    return r;
  }
  TORCH_CHECK(t->device() == device_, "dlopt: ", name, " is on ", t->device(),
              " but params are on ", device_);
  r.dtype = scalar_dtype(t->scalar_type(), name);
  r.ptr = t->const_data_ptr();
  return r;
}

void HostCall::align(std::initializer_list<at::TensorList> lists,
                     std::initializer_list<bool> mutated) {
  TORCH_INTERNAL_ASSERT(lists.size() <= static_cast<size_t>(kMaxLists));
  const AlignedLists& L = aligned_.emplace(lists, mutated);
  const std::vector<bool> writes(mutated);
  const bool has_state = lists.size() > 2 && !L[2].empty();
  entries_.assign(tensors_.size(), ParamEntry{});
  for (size_t i = 0; i < entries_.size(); ++i) {
    ParamEntry& e = entries_[i];
    e.numel = L[0][i].numel();
    e.index = static_cast<int32_t>(i);
    e.param = dtype_of(L[0][i].scalar_type());
    e.state = has_state ? dtype_of(L[2][i].scalar_type()) : DType::kF32;
    if (e.numel == 0) continue;
    for (size_t k = 0; k < lists.size(); ++k) {
      if (L[k].empty()) continue;
      const at::Tensor& t = L[k][i];
      // const_data_ptr for read-only lists: a copy-on-write tensor need not materialize
      e.ptr[k] = writes[k] ? t.data_ptr() : const_cast<void*>(t.const_data_ptr());
    }
  }
}

const Launch& HostCall::launch() {
  launch_.entries = entries_.data();
  launch_.n = static_cast<int32_t>(entries_.size());
  launch_.steps = steps_.empty() ? nullptr : steps_.data();
  launch_.stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
  launch_.scratch = {&HostCall::alloc, this};
  return launch_;
}

void* HostCall::alloc(void* self, size_t bytes) {
  auto* call = static_cast<HostCall*>(self);
  try {  // no exception may cross into the nvcc-compiled caller
    call->scratch_.push_back(at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                                       at::TensorOptions().dtype(at::kByte).device(call->device_)));
    return call->scratch_.back().data_ptr();
  } catch (...) {
    call->alloc_error_ = std::current_exception();
    return nullptr;
  }
}

void HostCall::finish(cudaError_t err) {
  if (alloc_error_) std::rethrow_exception(alloc_error_);
  C10_CUDA_CHECK(err);
  if (aligned_) aligned_->finish();
  contiguous_.finish();
}

}  // namespace cuda
}  // namespace dlopt
