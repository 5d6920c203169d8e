#include "engine/worker_thread.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <exception>
#include <optional>
#include <thread>

namespace torch_ar {

void run_on_worker_thread(const std::vector<at::Tensor>& tensors,
                          const std::function<void()>& body) {
  at::ThreadLocalState tls;
  // Thread-local, and not part of ThreadLocalState: the caller's handler is
  // Python's while a torch binding runs (it turns warnings into Python
  // warnings when the call returns); the caller is blocked in join() while
  // the worker uses it.
  c10::WarningHandler* warnings = c10::WarningUtils::get_warning_handler();
  std::optional<c10::Stream> stream;
  for (const auto& t : tensors) {
    if (t.defined() && t.device().type() != c10::DeviceType::CPU) {
      c10::impl::VirtualGuardImpl impl(t.device().type());
      stream = impl.getStream(t.device());
      break;
    }
  }
  std::exception_ptr error;
  std::thread worker([&] {
    try {
      at::init_num_threads(); // honour torch.set_num_threads in this thread too
      at::ThreadLocalStateGuard guard(tls);
      c10::WarningUtils::WarningHandlerGuard warning_guard(warnings);
      std::optional<c10::StreamGuard> stream_guard;
      if (stream) stream_guard.emplace(*stream);
      body();
    } catch (...) {
      error = std::current_exception();
    }
  });
  worker.join();
  if (error) std::rethrow_exception(error);
}

} // namespace torch_ar
