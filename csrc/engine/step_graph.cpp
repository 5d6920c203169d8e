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

void refuse_next_capture_for_testing() { refusal_requested.store(true); }

bool take_refusal_request() { return refusal_requested.exchange(false); }

} // namespace torch_ar
