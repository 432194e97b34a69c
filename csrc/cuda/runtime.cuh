// The CUDA runtime pieces the kernels need from torch, through the stable ABI
// only: the current stream of a device, a device guard, and the launch check
// (C10_CUDA_KERNEL_LAUNCH_CHECK's job).
#pragma once
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/headeronly/util/Exception.h>

#include "errors.h"
#include "tensors.h"

namespace amp_engine::cuda {

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// torch's current stream on `device` (what every launch of an op goes to).
inline cudaStream_t current_stream(const Device& device) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// After every launch: a bad configuration or a missing kernel image surfaces
// here, not at some later unrelated call.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  STD_TORCH_CHECK(err == cudaSuccess, "amp_engine: launching ", kernel, " failed: ",
                  cudaGetErrorString(err));
}

inline void check_cuda(const Device& dev) {
  AMP_CHECK_VALUE(dev.type() == DeviceType::CUDA, "the CUDA kernel got tensors on ", name(dev));
}

}  // namespace amp_engine::cuda
