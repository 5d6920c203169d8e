// The CUDA implementation of StepGraph (engine/step_graph.h): a block of
// relaxation steps recorded as a CUDA graph on a side stream and replayed
// there. The whole relaxation loop runs on that stream, so that the eager
// steps before the capture also initialise what the libraries create lazily
// per stream (cuBLAS workspaces, cuDNN handles) outside the capture.
// Everything the steps touch keeps its address from one replay to the next:
// the states and activation buffers are updated in place, and what the steps
// allocate comes from the graph's memory pool.
//
// Recording uses the CUDA runtime and the caching allocator's pool routing
// directly (engine/graph_recorder.h), not at::cuda::CUDAGraph: that class
// also puts the default generator into capture mode and registers the pool
// with the pinned host allocator, whose per-pool use count has no lasting
// reference of ours, so every capture after the first would fail and a
// failed capture would leave CUDA random numbers broken for the process.
//
// Streams and pools: a lane is one side stream of a device with one memory
// pool. A relaxation leases an idle lane and gives it back when it ends, so
// successive backwards (on any thread, the short-lived worker of
// autograd.grad included) use the same stream, whose cuBLAS workspace is made
// once, and the same pool, whose blocks the next capture takes again instead
// of growing memory by a fresh pool per backward. Concurrent relaxations
// lease different lanes (two captures may not record into one pool at once).
// A lane's pool holds a reference of its own; release_idle_graph_memory()
// gives back those of idle lanes so that empty_cache() can free them.

#include "engine/graph_recorder.h"
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

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace torch_ar {
namespace {

namespace allocator = c10::cuda::CUDACachingAllocator;

bool is_pool(const at::cuda::MempoolId_t& pool) {
  return pool.first != 0 || pool.second != 0;
}

struct Lane {
  Lane(c10::DeviceIndex device, c10::cuda::CUDAStream stream) : device(device), stream(stream) {}
  const c10::DeviceIndex device;
  const c10::cuda::CUDAStream stream;
  at::cuda::MempoolId_t pool{0, 0}; // none yet, or released
  bool leased = false;
};

class Lanes {
 public:
  // Never destroyed: its streams would outlive the CUDA context at exit.
  static Lanes& instance() {
    static Lanes* lanes = new Lanes();
    return *lanes;
  }

  Lane* lease(c10::DeviceIndex device) {
    std::lock_guard<std::mutex> lock(mutex_);
    Lane* lane = nullptr;
    for (const auto& candidate : lanes_) {
      if (candidate->device == device && !candidate->leased) {
        lane = candidate.get();
        break;
      }
    }
    if (lane == nullptr) {
      const c10::cuda::CUDAGuard guard(device);
      cudaStream_t raw = nullptr;
      C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
      lanes_.push_back(
          std::make_unique<Lane>(device, c10::cuda::getStreamFromExternal(raw, device)));
      lane = lanes_.back().get();
    }
    if (!is_pool(lane->pool)) {
      const at::cuda::MempoolId_t pool = at::cuda::graph_pool_handle();
      allocator::createOrIncrefPool(device, pool);
      lane->pool = pool;
    }
    lane->leased = true;
    return lane;
  }

  void give_back(Lane* lane) {
    std::lock_guard<std::mutex> lock(mutex_);
    lane->leased = false;
  }

  int64_t release_idle_pools() {
    int64_t released = 0;
    bool busy = false;
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& lane : lanes_) {
      busy = busy || lane->leased;
      if (lane->leased || !is_pool(lane->pool)) continue;
      allocator::releasePool(lane->device, lane->pool);
      lane->pool = {0, 0};
      ++released;
    }
    // A leased lane may be capturing, and its capture must see no cudaFree:
    // the cache is emptied only when none is, under the lock, so that no
    // capture starts meanwhile (else the released blocks stay cached for
    // torch.cuda.empty_cache() or the next call).
    if (released > 0 && !busy) allocator::emptyCache();
    return released;
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Lane>> lanes_;
};

class LaneLease {
 public:
  explicit LaneLease(c10::DeviceIndex device) : lane_(Lanes::instance().lease(device)) {}
  ~LaneLease() { Lanes::instance().give_back(lane_); }
  LaneLease(const LaneLease&) = delete;
  LaneLease& operator=(const LaneLease&) = delete;
  const c10::cuda::CUDAStream& stream() const { return lane_->stream; }
  at::cuda::MempoolId_t pool() const { return lane_->pool; }

 private:
  Lane* const lane_;
};

// The runtime and allocator calls of one capture on a lane.
class CudaCaptureDevice final : public CaptureDevice {
 public:
  CudaCaptureDevice(c10::DeviceIndex device, cudaStream_t stream, at::cuda::MempoolId_t pool)
      : device_(device), stream_(stream), pool_(pool) {}

  ~CudaCaptureDevice() override { discard_graph(); }

  void begin_pool_routing() override {
    // Only this capture's allocations go to the pool: work of other threads
    // and streams keeps allocating as usual.
    allocator::beginAllocateToPool(device_, pool_, [this](cudaStream_t stream) {
      const unsigned long long id = capture_id_.load();
      if (id == 0) return false;
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      unsigned long long stream_id = 0;
      if (cudaStreamGetCaptureInfo(stream, &status, &stream_id) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
      }
      return status == cudaStreamCaptureStatusActive && stream_id == id;
    });
  }

  void end_pool_routing() override { allocator::endAllocateToPool(device_, pool_); }

  void release_pool() override { allocator::releasePool(device_, pool_); }

  void begin_capture() override {
    // Thread-local mode: other threads (a data loader, say) may keep calling
    // the CUDA runtime while this thread records.
    C10_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    unsigned long long id = 0;
    C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream_, &status, &id));
    capture_id_.store(id);
  }

  bool end_capture() noexcept override {
    capture_id_.store(0);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream_, &status) != cudaSuccess ||
        status == cudaStreamCaptureStatusNone) {
      (void)cudaGetLastError();
      return false;
    }
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    // The refused call left its error for the next launch check to find.
    (void)cudaGetLastError();
    if (ended != cudaSuccess || graph == nullptr) {
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      return false;
    }
    graph_ = graph;
    return true;
  }

  void instantiate() override {
    TORCH_INTERNAL_ASSERT(graph_ != nullptr);
    C10_CUDA_CHECK(cudaGraphInstantiateWithFlags(&exec_, graph_, 0));
    // The executable graph is all a replay needs.
    (void)cudaGraphDestroy(graph_);
    graph_ = nullptr;
  }

  void launch() override { C10_CUDA_CHECK(cudaGraphLaunch(exec_, stream_)); }

  void discard_graph() noexcept override {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) (void)cudaGraphDestroy(graph_);
    exec_ = nullptr;
    graph_ = nullptr;
    (void)cudaGetLastError();
  }

  std::string sticky_error() noexcept override {
    const cudaError_t probe = cudaDeviceSynchronize();
    if (probe == cudaSuccess) return "";
    return cudaGetErrorString(probe);
  }

 private:
  const c10::DeviceIndex device_;
  const cudaStream_t stream_;
  const at::cuda::MempoolId_t pool_;
  std::atomic<unsigned long long> capture_id_{0};
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

class CudaStepGraph final : public StepGraph {
 public:
  explicit CudaStepGraph(const c10::Device& device)
      : device_(device.index()),
        lease_(device.index()),
        device_guard_(device),
        caller_(c10::cuda::getCurrentCUDAStream(device.index())),
        stream_guard_(lease_.stream()) {
    at::cuda::CUDAEvent ready;
    ready.record(caller_);
    ready.block(lease_.stream());
  }

  // Never throws: after a device fault the event calls fail too, and an
  // exception here would abort the process instead of reaching Python.
  ~CudaStepGraph() override {
    try {
      // The caller's later work (the gradients) reads what the loop wrote.
      at::cuda::CUDAEvent done;
      done.record(lease_.stream());
      done.block(caller_);
    } catch (const std::exception& e) {
      TORCH_WARN("torch_ar: could not order the caller's stream after the relaxation: ", e.what());
    }
  }

  void capture(const std::function<void()>& step) override {
    // Work already queued must not be recorded, and memory it frees must be
    // free before the capture starts. Device-wide, as torch.cuda.graph does
    // before its captures: once per backward (a capture records one step),
    // so a lane-stream wait would save little and leave work queued on other
    // streams (their frees, the allocator's pending events) unsettled.
    c10::cuda::device_synchronize();
    // Autocast's cache of cast weights must not hand out tensors of the
    // graph's pool to later eager code (a backward run inside autocast).
    const bool autocast_cache = at::autocast::is_autocast_cache_enabled();
    at::autocast::set_autocast_cache_enabled(false);
    struct RestoreCache {
      bool enabled;
      ~RestoreCache() { at::autocast::set_autocast_cache_enabled(enabled); }
    } restore_cache{autocast_cache};
    recorder_.emplace(
        std::make_unique<CudaCaptureDevice>(device_, lease_.stream().stream(), lease_.pool()));
    const cudaStream_t stream = lease_.stream().stream();
    try {
      recorder_->record([&] {
        if (take_refusal_request()) {
          // What a host synchronisation inside a step does to a capture.
          C10_CUDA_CHECK(cudaStreamSynchronize(stream));
        }
        step();
      });
    } catch (...) {
      recorder_.reset();
      throw;
    }
  }

  void replay() override { recorder_->replay(); }

 private:
  const c10::DeviceIndex device_;
  const LaneLease lease_;
  const c10::cuda::CUDAGuard device_guard_;
  const c10::cuda::CUDAStream caller_;
  const c10::cuda::CUDAStreamGuard stream_guard_;
  // Declared last, so destroyed first of the members (its blocks returned to
  // the pool): after the destructor's body has joined the lane's stream back
  // into the caller's, and before the caller's stream is restored and the
  // lane given back.
  std::optional<GraphRecorder> recorder_;
};

std::unique_ptr<StepGraph> make_cuda_step_graph(const c10::Device& device) {
  // Graph memory pools are the native caching allocator's; another backend
  // (PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync) cannot make one.
  const std::string allocator = c10::cuda::CUDACachingAllocator::name();
  if (allocator != "native") {
    TORCH_WARN_ONCE("torch_ar: cuda_graph=True, but the CUDA allocator is '", allocator,
                    "'; CUDA graphs need the native caching allocator's memory pools, so the "
                    "steps run without one.");
    return nullptr;
  }
  return std::make_unique<CudaStepGraph>(device);
}

int64_t release_idle_cuda_graph_memory() {
  return Lanes::instance().release_idle_pools();
}

// Registered when the library loads, like the operator kernels.
const bool registered = [] {
  set_step_graph_factory(c10::DeviceType::CUDA, &make_cuda_step_graph);
  set_graph_memory_releaser(c10::DeviceType::CUDA, &release_idle_cuda_graph_memory);
  return true;
}();

} // namespace
} // namespace torch_ar
