#pragma once
// The order of calls that records a block of steps as a device graph and the
// clean-up of every way it can fail, written once against the few runtime and
// allocator calls it needs (CaptureDevice). The CUDA implementation of those
// calls is in kernels/cuda_step_graph.cu; the GoogleTests drive this class
// with a stand-in device that keeps the allocator's books, so the failure
// paths run on machines without a GPU.
//
// Recording touches nothing but the capture stream and the allocator's pool
// routing: no random-number generator and no host-allocator state (an RNG op
// inside a step makes the capture fail, which is a refusal like any other).

#include <functional>
#include <memory>
#include <string>

namespace torch_ar {

// One stream and one memory pool of a device, as the recorder uses them.
// Each call mirrors one runtime or allocator call.
class CaptureDevice {
 public:
  virtual ~CaptureDevice() = default;
  // Allocations made by the capture go to the pool from now on; takes a
  // reference to the pool that release_pool() gives back.
  virtual void begin_pool_routing() = 0;
  // Stops routing allocations to the pool (the reference stays: the graph's
  // memory lives there until the graph is destroyed).
  virtual void end_pool_routing() = 0;
  virtual void release_pool() = 0;
  // Starts capturing the stream's work. Throws when the device refuses.
  virtual void begin_capture() = 0;
  // Ends the stream's capture, whatever state it is in; true when it left a
  // valid graph. Never throws: it must run on every failure path.
  virtual bool end_capture() noexcept = 0;
  // Turns the captured graph into one that can be launched. Throws.
  virtual void instantiate() = 0;
  virtual void launch() = 0;
  // Destroys whatever end_capture() and instantiate() made.
  virtual void discard_graph() noexcept = 0;
  // The device's own error after a failure ("" when the device is healthy:
  // the failure was the capture's alone).
  virtual std::string sticky_error() noexcept = 0;
};

// Records once, replays many times; destroying it destroys the graph and
// gives its pool reference back.
class GraphRecorder {
 public:
  explicit GraphRecorder(std::unique_ptr<CaptureDevice> device);
  ~GraphRecorder();
  GraphRecorder(const GraphRecorder&) = delete;
  GraphRecorder& operator=(const GraphRecorder&) = delete;

  // Records `step` without running its work. On any failure the stream, the
  // allocator and the pool are left as they were before the call, and it
  // throws: StepGraphDeviceFault (engine/step_graph.h) when the device itself
  // failed, c10::Error when it refused to record, or the step's own exception
  // when that was not a c10::Error.
  void record(const std::function<void()>& step);
  void replay();
  bool recorded() const { return recorded_; }

 private:
  // Undoes begin_pool_routing(); never throws.
  void stop_routing_and_release() noexcept;
  [[noreturn]] void fail(const std::string& what);

  std::unique_ptr<CaptureDevice> device_;
  bool recorded_ = false;
};

} // namespace torch_ar
