#pragma once
// Engine work on a thread of its own, as the caller's thread would run it:
// the relaxation inside torch.autograd.grad(..., inputs=...) must run where
// the outer graph task's exec_info is not current.

#include <ATen/ATen.h>

#include <functional>
#include <vector>

namespace torch_ar {

// Runs `body` on a new thread with the caller's thread-local state (grad
// mode, autocast, dispatch keys), its thread count, the current stream of
// the first accelerator tensor in `tensors`, and its warning handler, so
// that a warning raised there reaches Python's warnings as the caller's
// would (a new thread's own handler prints to stderr). Rethrows what `body`
// threw; the caller waits.
void run_on_worker_thread(const std::vector<at::Tensor>& tensors,
                          const std::function<void()>& body);

} // namespace torch_ar
