#pragma once
// The engine's user-facing error types. Each is a c10::Error (so C++ callers
// catching those keep working) that the Python binding raises as its own
// Python exception (torch_ar/errors.py: RelaxationDivergedError with .node
// and .step, UnsupportedGraphError with .node).

#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

namespace torch_ar {

// A state became NaN or infinite during relaxation.
class RelaxationDiverged : public c10::Error {
 public:
  RelaxationDiverged(std::string message, std::string node, int64_t step)
      : c10::Error(c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                   std::move(message)),
        node_(std::move(node)),
        step_(step) {}

  // The state's name (as in RelaxationStats.state_names) and the step at
  // which it stopped being finite (the closed form: the Horner stage).
  const std::string& node() const { return node_; }
  int64_t step() const { return step_; }

 private:
  std::string node_;
  int64_t step_;
};

// The forward's graph cannot be relaxed as it is (a tensor from outside the
// module that requires grad, an opaque torch.compile region).
class UnsupportedGraph : public c10::Error {
 public:
  UnsupportedGraph(std::string message, std::string node)
      : c10::Error(c10::SourceLocation{__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                   std::move(message)),
        node_(std::move(node)) {}

  // The autograd node that cannot be relaxed.
  const std::string& node() const { return node_; }

 private:
  std::string node_;
};

} // namespace torch_ar
