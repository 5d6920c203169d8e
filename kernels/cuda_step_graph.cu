// The CUDA implementation of StepGraph (engine/step_graph.h): one relaxation
// step recorded as a CUDA graph on a side stream and replayed there. The
// whole relaxation loop runs on that stream, so that the eager steps before
// the capture also initialise what the libraries create lazily per stream
// (cuBLAS workspaces, cuDNN handles) outside the capture. Everything the step touches keeps its address from one replay to
// the next: the states and activation buffers are updated in place, and what
// the step allocates comes from the graph's private memory pool, which gives
// the same addresses on every replay.

#include "engine/step_graph.h"

#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace torch_ar {
namespace {

class CudaStepGraph final : public StepGraph {
 public:
  explicit CudaStepGraph(const c10::Device& device)
      : device_guard_(device),
        caller_(c10::cuda::getCurrentCUDAStream(device.index())),
        side_(c10::cuda::getStreamFromPool(false, device.index())),
        stream_guard_(side_) {
    at::cuda::CUDAEvent ready;
    ready.record(caller_);
    ready.block(side_);
  }

  ~CudaStepGraph() override {
    // The caller's later work (the gradients) reads what the loop wrote.
    at::cuda::CUDAEvent done;
    done.record(side_);
    done.block(caller_);
  }

  void capture(const std::function<void()>& step) override {
    // Work already queued must not be recorded, and memory it frees must be
    // free before the graph's pool is set up.
    c10::cuda::device_synchronize();
    // Autocast's cache of cast weights must not hand out tensors of the
    // graph's pool to later eager code (a backward run inside autocast).
    const bool autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    struct RestoreCache {
      bool enabled;
      ~RestoreCache() { at::autocast::set_autocast_cache_enabled(enabled); }
    } restore_cache{autocast_cache};
    // Thread-local mode: other threads (a data loader, say) may keep calling
    // the CUDA runtime while this thread records.
    graph_.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    try {
      step();
    } catch (...) {
      try {
        graph_.capture_end();
      } catch (...) {
        // The capture was invalidated; the step's own error says why.
      }
      // The refused call left its error for the next launch check to find.
      (void)cudaGetLastError();
      throw;
    }
    graph_.capture_end();
  }

  void replay() override { graph_.replay(); }

 private:
  const c10::cuda::CUDAGuard device_guard_;
  const c10::cuda::CUDAStream caller_;
  const c10::cuda::CUDAStream side_;
  const c10::cuda::CUDAStreamGuard stream_guard_;
  // Declared last: destroyed (its pool released) before the streams are
  // joined and the caller's stream restored.
  at::cuda::CUDAGraph graph_;
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
