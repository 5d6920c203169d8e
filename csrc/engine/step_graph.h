#pragma once
// Record one relaxation step and replay it. On a GPU a step is hundreds of
// small kernel launches; a CUDA graph replays them with one. The engine only
// sees this interface: the CUDA implementation (kernels/cuda_step_graph.cu)
// registers itself when the library loads, and CPU-only builds have none.

#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>

namespace torch_ar {

// Thrown by capture() when the device itself failed (a sticky CUDA error):
// not a refusal to record, so the relaxation must not go on without a graph.
class StepGraphDeviceFault : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Lives for one relaxation loop. While it does, the loop's work (eager
// warm-up steps, the recorded step, its replays) runs where the graph
// needs it (on CUDA: a side stream, ordered after the caller's stream and
// waited for by it when the object goes away).
class StepGraph {
 public:
  virtual ~StepGraph() = default;
  // Records `step` without running it; throws c10::Error when the device
  // refuses to record it (the loop then runs without a graph) and
  // StepGraphDeviceFault when the device failed.
  virtual void capture(const std::function<void()>& step) = 0;
  // Runs what was recorded.
  virtual void replay() = 0;
};

using StepGraphFactory = std::unique_ptr<StepGraph> (*)(const c10::Device& device);

// The factory for a device type; nullptr removes it. Returns the previous one.
StepGraphFactory set_step_graph_factory(c10::DeviceType type, StepGraphFactory factory);

// nullptr when no implementation is registered for the device's type.
std::unique_ptr<StepGraph> make_step_graph(const c10::Device& device);

// Graph memory: the recorded steps of one backward reuse the memory pool of
// the backward before (so memory stays flat across batches), and that pool
// is kept while the process runs. A releaser gives back the pools no graph
// is using, so that the allocator's empty_cache() can return their memory,
// and says how many it released; the next graph makes a new pool.
using GraphMemoryReleaser = int64_t (*)();
GraphMemoryReleaser set_graph_memory_releaser(c10::DeviceType type, GraphMemoryReleaser releaser);
// Every registered device type's idle pools; 0 when none is registered.
int64_t release_idle_graph_memory();

// Tests of the failure path: the next capture does something the device
// refuses while capturing (a stream synchronisation), so that the refusal and
// its clean-up run as they would for a real one.
void refuse_next_capture_for_testing();
bool take_refusal_request();

} // namespace torch_ar
