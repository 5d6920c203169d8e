// The CUDA implementation of StepGraph (engine/step_graph.h): a block of
// relaxation steps recorded as a CUDA graph on a side stream and replayed
// there. The whole relaxation loop runs on that stream, so that the eager
// steps before the capture also initialise what the libraries create lazily
// per stream (cuBLAS workspaces, cuDNN handles) outside the capture.
// Everything the steps touch keeps its address from one replay to the next:
// the states and activation buffers are updated in place, and what the steps
// allocate comes from the graph's memory pool, which gives the same addresses
// on every replay.
//
// Memory: every graph on a device records into one pool that this file keeps
// alive for the process. A destroyed graph's blocks return to that pool and
// the next backward's capture takes them again, so memory_reserved() stays at
// the largest step's need instead of growing by a fresh private pool per
// backward (a freed private pool only returns its memory on empty_cache()).
//
// Failure: a capture the device refuses leaves PyTorch's allocator routing
// the stream's allocations to the pool (capture_end throws before it stops
// that); we end the routing and give back the pool reference the capture
// took, so empty_cache() and later captures work, and the loop relaxes
// without a graph.

#include "engine/step_graph.h"

#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <unordered_map>

namespace torch_ar {
namespace {

namespace allocator = c10::cuda::CUDACachingAllocator;

// The pool all relaxation graphs on `device` record into, created once with a
// reference of its own so that it outlives every graph.
at::cuda::MempoolId_t device_pool(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, at::cuda::MempoolId_t> pools;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = pools.find(device);
  if (it != pools.end()) return it->second;
  const at::cuda::MempoolId_t pool = at::cuda::graph_pool_handle();
  allocator::createOrIncrefPool(device, pool);
  pools.emplace(device, pool);
  return pool;
}

// A CUDAGraph that says whether a capture got as far as owning a graph (its
// own reset() then gives its pool reference back).
struct RelaxationGraph : at::cuda::CUDAGraph {
  bool owns_capture() const { return has_graph_ || has_graph_exec_; }
};

// The device's own error state after a failed call, as a message, or "" when
// the device is healthy (the failure was the capture's alone).
std::string sticky_device_error() {
  const cudaError_t probe = cudaDeviceSynchronize();
  if (probe == cudaSuccess) return "";
  return cudaGetErrorString(probe);
}

class CudaStepGraph final : public StepGraph {
 public:
  explicit CudaStepGraph(const c10::Device& device)
      : device_(device.index()),
        device_guard_(device),
        caller_(c10::cuda::getCurrentCUDAStream(device.index())),
        side_(c10::cuda::getStreamFromPool(false, device.index())),
        stream_guard_(side_) {
    at::cuda::CUDAEvent ready;
    ready.record(caller_);
    ready.block(side_);
  }

  // Never throws: after a device fault the event calls fail too, and an
  // exception here would abort the process instead of reaching Python.
  ~CudaStepGraph() override {
    try {
      // The caller's later work (the gradients) reads what the loop wrote.
      at::cuda::CUDAEvent done;
      done.record(side_);
      done.block(caller_);
    } catch (const std::exception& e) {
      TORCH_WARN("torch_ar: could not order the caller's stream after the relaxation: ", e.what());
    }
  }

  void capture(const std::function<void()>& step) override {
    // Work already queued must not be recorded, and memory it frees must be
    // free before the capture starts.
    c10::cuda::device_synchronize();
    // Autocast's cache of cast weights must not hand out tensors of the
    // graph's pool to later eager code (a backward run inside autocast).
    const bool autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    struct RestoreCache {
      bool enabled;
      ~RestoreCache() { at::autocast::set_autocast_cache_enabled(enabled); }
    } restore_cache{autocast_cache};
    const at::cuda::MempoolId_t pool = device_pool(device_);
    // Thread-local mode: other threads (a data loader, say) may keep calling
    // the CUDA runtime while this thread records.
    graph_.capture_begin(pool, cudaStreamCaptureModeThreadLocal);
    try {
      if (take_refusal_request()) {
        // What a host synchronisation inside a step does to a capture.
        C10_CUDA_CHECK(cudaStreamSynchronize(side_.stream()));
      }
      step();
      graph_.capture_end();
    } catch (const c10::Error& e) {
      abandon_capture(pool);
      const std::string fault = sticky_device_error();
      if (!fault.empty()) {
        // Not the capture's fault: the device is unusable. Say so.
        throw StepGraphDeviceFault(
            "torch_ar: CUDA device " + std::to_string(device_) + " failed while recording the "
            "relaxation steps (" + fault + "); the device error is sticky, so no further work "
            "can run on it. The capture said: " + e.what_without_backtrace());
      }
      throw;
    }
  }

  void replay() override { graph_.replay(); }

 private:
  // Leaves the stream, the allocator and the pool as they were before the
  // capture began. Never throws.
  void abandon_capture(const at::cuda::MempoolId_t& pool) noexcept {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(side_.stream(), &status) == cudaSuccess &&
        status != cudaStreamCaptureStatusNone) {
      cudaGraph_t partial = nullptr;
      (void)cudaStreamEndCapture(side_.stream(), &partial);
      if (partial != nullptr) (void)cudaGraphDestroy(partial);
    }
    // The refused call left its error for the next launch check to find.
    (void)cudaGetLastError();
    if (graph_.owns_capture()) return;  // the graph's reset() gives the pool back
    try {
      allocator::endAllocateToPool(device_, pool);
    } catch (const std::exception&) {
      // capture_end had already stopped the routing.
    }
    try {
      allocator::releasePool(device_, pool);
    } catch (const std::exception& e) {
      TORCH_WARN("torch_ar: could not release the CUDA graph pool after a refused capture: ",
                 e.what());
    }
  }

  const c10::DeviceIndex device_;
  const c10::cuda::CUDAGuard device_guard_;
  const c10::cuda::CUDAStream caller_;
  const c10::cuda::CUDAStream side_;
  const c10::cuda::CUDAStreamGuard stream_guard_;
  // Declared last: destroyed (its blocks returned to the pool) before the
  // streams are joined and the caller's stream restored.
  RelaxationGraph graph_;
};

std::unique_ptr<StepGraph> make_cuda_step_graph(const c10::Device& device) {
  return std::make_unique<CudaStepGraph>(device);
}

// Registered when the library loads, like the operator kernels.
const bool registered = [] {
  set_step_graph_factory(c10::DeviceType::CUDA, &make_cuda_step_graph);
  return true;
}();

} // namespace
} // namespace torch_ar
