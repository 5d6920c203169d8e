// engine/worker_thread.h: the relaxation inside torch.autograd.grad(inputs=)
// runs on a thread of its own; what it warns must reach the caller's warning
// handler (Python's, during a backward), not a new thread's default one,
// which prints to stderr.
#include "engine/worker_thread.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

class Collecting final : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override {
    messages.push_back(warning.msg());
    threads.push_back(std::this_thread::get_id());
  }
  std::vector<std::string> messages;
  std::vector<std::thread::id> threads;
};

TEST(WorkerThread, WarningsReachTheCallersHandler) {
  Collecting handler;
  c10::WarningUtils::WarningHandlerGuard guard(&handler);
  bool grad_mode_seen = true;
  {
    c10::AutoGradMode no_grad(false); // thread-local state travels too
    torch_ar::run_on_worker_thread({}, [&] {
      grad_mode_seen = c10::GradMode::is_enabled();
      TORCH_WARN("from the worker");
    });
  }
  ASSERT_EQ(handler.messages.size(), 1u);
  EXPECT_NE(handler.messages[0].find("from the worker"), std::string::npos);
  EXPECT_NE(handler.threads[0], std::this_thread::get_id()) << "the body ran on the caller";
  EXPECT_FALSE(grad_mode_seen);
}

TEST(WorkerThread, ErrorsAreRethrownOnTheCaller) {
  EXPECT_THROW(torch_ar::run_on_worker_thread({}, [] { throw std::runtime_error("boom"); }),
               std::runtime_error);
}

} // namespace
