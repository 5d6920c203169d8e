#include "engine/step_graph.h"

#include <array>
#include <atomic>
#include <mutex>

namespace torch_ar {

namespace {
std::atomic<bool> refusal_requested{false};
std::mutex factories_mutex;
std::array<StepGraphFactory, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
    factories{};
std::array<GraphMemoryReleaser, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
    releasers{};
} // namespace

StepGraphFactory set_step_graph_factory(c10::DeviceType type, StepGraphFactory factory) {
  std::lock_guard<std::mutex> lock(factories_mutex);
  StepGraphFactory previous = factories[static_cast<size_t>(type)];
  factories[static_cast<size_t>(type)] = factory;
  return previous;
}

std::unique_ptr<StepGraph> make_step_graph(const c10::Device& device) {
  StepGraphFactory factory;
  {
    std::lock_guard<std::mutex> lock(factories_mutex);
    factory = factories[static_cast<size_t>(device.type())];
  }
  return factory ? factory(device) : nullptr;
}

GraphMemoryReleaser set_graph_memory_releaser(c10::DeviceType type, GraphMemoryReleaser releaser) {
  std::lock_guard<std::mutex> lock(factories_mutex);
  GraphMemoryReleaser previous = releasers[static_cast<size_t>(type)];
  releasers[static_cast<size_t>(type)] = releaser;
  return previous;
}

int64_t release_idle_graph_memory() {
  std::array<GraphMemoryReleaser, releasers.size()> current;
  {
    std::lock_guard<std::mutex> lock(factories_mutex);
    current = releasers;
  }
  int64_t released = 0;
  for (GraphMemoryReleaser release : current)
    if (release) released += release();
  return released;
}

void refuse_next_capture_for_testing() {
  refusal_requested.store(true);
}

bool take_refusal_request() {
  return refusal_requested.exchange(false);
}

} // namespace torch_ar
