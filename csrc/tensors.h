// The stable-ABI tensor vocabulary every source shares: type names, the dense
// test ATen used to provide, and printing in ATen's words (error messages).
#pragma once
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/Layout.h>
#include <torch/headeronly/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

namespace amp_engine {

using Tensor = torch::stable::Tensor;
using TensorList = std::vector<Tensor>;
using OptTensor = std::optional<Tensor>;
using Device = torch::stable::Device;
using DeviceType = torch::headeronly::DeviceType;
using Layout = torch::headeronly::Layout;
using ScalarType = torch::headeronly::ScalarType;

// ---------------------------------------------------------------- printing
struct DtypeName {
  ScalarType t;
};
inline std::ostream& operator<<(std::ostream& os, DtypeName d) {
  return os << torch::headeronly::toString(d.t);  // "Float", "Half", ... as ATen prints
}
inline DtypeName name(ScalarType t) { return {t}; }

struct DeviceName {
  Device d;
};
inline std::ostream& operator<<(std::ostream& os, const DeviceName& n) {
  switch (n.d.type()) {
    case DeviceType::CPU: os << "cpu"; break;
    case DeviceType::CUDA: os << "cuda"; break;
    case DeviceType::Meta: os << "meta"; break;
    case DeviceType::XPU: os << "xpu"; break;
    case DeviceType::MPS: os << "mps"; break;
    default: os << "device type " << static_cast<int>(n.d.type());
  }
  if (n.d.index() >= 0) os << ":" << static_cast<int>(n.d.index());
  return os;
}
inline DeviceName name(const Device& d) { return {d}; }

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Strided: return "Strided";
    case Layout::Sparse: return "Sparse";
    case Layout::SparseCsr: return "SparseCsr";
    case Layout::Mkldnn: return "Mkldnn";
    case Layout::SparseCsc: return "SparseCsc";
    case Layout::SparseBsr: return "SparseBsr";
    case Layout::SparseBsc: return "SparseBsc";
    default: return "Jagged";
  }
}

struct Shape {
  std::vector<int64_t> dims;
};
inline std::ostream& operator<<(std::ostream& os, const Shape& s) {
  os << "[";
  for (size_t i = 0; i < s.dims.size(); ++i) os << (i ? ", " : "") << s.dims[i];
  return os << "]";
}
inline Shape shape(const Tensor& t) {
  const auto s = t.sizes();
  return {std::vector<int64_t>(s.begin(), s.end())};
}

// ---------------------------------------------------------------- layouts
inline bool same_device(const Device& a, const Device& b) {
  return a.type() == b.type() && a.index() == b.index();
}

inline bool same_sizes(const Tensor& a, const Tensor& b) {
  const auto sa = a.sizes();
  const auto sb = b.sizes();
  return sa.size() == sb.size() && std::equal(sa.begin(), sa.end(), sb.begin());
}

// ATen's is_non_overlapping_and_dense: some permutation of the dims is
// contiguous, so the kernels may walk the memory as one flat array.
inline bool is_dense(const Tensor& t) {
  if (t.is_contiguous()) return true;  // one call; the rest only for views
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  const int64_t dim = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> perm(dim);
  for (int64_t i = 0; i < dim; ++i) perm[i] = i;
  // size-1 dims last, the others by increasing stride
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
    if (sizes[a] < 2) return false;
    if (sizes[b] < 2) return true;
    return strides[a] < strides[b];
  });
  int64_t require = 1;
  for (int64_t d : perm) {
    if (sizes[d] == 1) continue;
    if (strides[d] != require) return false;
    require *= sizes[d];
  }
  return true;
}

// Same sizes and, on every dimension longer than 1, the same stride: two dense
// tensors so related are walked element for element by the same flat index.
inline bool same_layout(const Tensor& a, const Tensor& b) {
  if (!same_sizes(a, b)) return false;
  const auto sizes = a.sizes();
  const auto sa = a.strides();
  const auto sb = b.strides();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && sa[d] != sb[d]) return false;
  }
  return true;
}

template <class T>
inline T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace amp_engine
