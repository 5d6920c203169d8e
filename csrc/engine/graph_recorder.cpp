#include "engine/graph_recorder.h"

#include "engine/step_graph.h"

#include <c10/util/Exception.h>

#include <exception>
#include <utility>

namespace torch_ar {

GraphRecorder::GraphRecorder(std::unique_ptr<CaptureDevice> device) : device_(std::move(device)) {
  TORCH_INTERNAL_ASSERT(device_ != nullptr);
}

GraphRecorder::~GraphRecorder() {
  if (!recorded_) return;
  device_->discard_graph();
  try {
    device_->release_pool();
  } catch (const std::exception& e) {
    TORCH_WARN("torch_ar: could not release the CUDA graph's memory pool: ", e.what());
  }
}

void GraphRecorder::stop_routing_and_release() noexcept {
  try {
    device_->end_pool_routing();
  } catch (const std::exception& e) {
    TORCH_WARN("torch_ar: could not stop routing allocations to the graph pool: ", e.what());
  }
  try {
    device_->release_pool();
  } catch (const std::exception& e) {
    TORCH_WARN("torch_ar: could not release the graph pool: ", e.what());
  }
}

void GraphRecorder::fail(const std::string& what) {
  const std::string fault = device_->sticky_error();
  if (!fault.empty()) {
    throw StepGraphDeviceFault(
        "torch_ar: the device failed while recording the relaxation steps (" + fault +
        "); the error is sticky, so no further work can run on it. The capture said: " + what);
  }
  TORCH_CHECK(false, what);
}

void GraphRecorder::record(const std::function<void()>& step) {
  TORCH_INTERNAL_ASSERT(!recorded_, "GraphRecorder::record called twice");
  // Routing starts before the capture, as PyTorch's own graphs do, so that a
  // free on another thread never sees the stream capturing without a pool.
  device_->begin_pool_routing();
  // A begin that failed after the capture started (a query after
  // cudaStreamBeginCapture) must still end it: a lane left capturing fails
  // every later launch on it.
  auto abandon_capture = [this] {
    (void)device_->end_capture();
    device_->discard_graph();
    stop_routing_and_release();
  };
  try {
    device_->begin_capture();
  } catch (const c10::Error& e) {
    abandon_capture();
    fail(e.what_without_backtrace());
  } catch (...) {
    abandon_capture();
    throw;
  }
  std::exception_ptr step_error;
  try {
    step();
  } catch (...) {
    step_error = std::current_exception();
  }
  // Always ended, or the stream stays in capture mode for ever.
  const bool captured = device_->end_capture();
  if (step_error || !captured) {
    device_->discard_graph();
    stop_routing_and_release();
    if (!step_error)
      fail("the capture was invalidated (the step did something a graph cannot record)");
    try {
      std::rethrow_exception(step_error);
    } catch (const c10::Error& e) {
      fail(e.what_without_backtrace());
    }
  }
  try {
    device_->end_pool_routing();
  } catch (...) {
    device_->discard_graph();
    try {
      device_->release_pool();
    } catch (...) {
    }
    throw;
  }
  try {
    device_->instantiate();
  } catch (const c10::Error& e) {
    device_->discard_graph();
    try {
      device_->release_pool();
    } catch (...) {
    }
    fail(e.what_without_backtrace());
  }
  recorded_ = true;
}

void GraphRecorder::replay() {
  TORCH_INTERNAL_ASSERT(recorded_, "GraphRecorder::replay before a successful record");
  device_->launch();
}

} // namespace torch_ar
