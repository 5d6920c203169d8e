// The graph recorder's bookkeeping (engine/graph_recorder.h), driven by a
// stand-in device that keeps the books the CUDA caching allocator keeps for a
// pool: its use count (with the allocator's own `use_count > 0` assertion on
// every new reference), whether allocations are routed to it, and whether
// the stream is capturing. Every path, successful or not, must leave those
// books as it found them once the recorder is gone.
#include "engine/graph_recorder.h"
#include "engine/step_graph.h"

#include <c10/util/Exception.h>
#include <gtest/gtest.h>

#include <memory>
#include <stdexcept>
#include <string>

namespace {

using torch_ar::CaptureDevice;
using torch_ar::GraphRecorder;

struct Books {
  int pool_use_count = 1; // the lane's own lasting reference
  bool routing = false;
  bool capturing = false;
  int graphs = 0; // captured or instantiated, not yet destroyed
  int launches = 0;
  // Failures to inject.
  bool refuse_begin = false;
  bool fail_after_begin = false; // the capture started, then a query failed
  bool invalidate = false;
  bool refuse_instantiate = false;
  std::string sticky;
};

class BookkeepingDevice final : public CaptureDevice {
 public:
  explicit BookkeepingDevice(Books& books) : books_(books) {}

  void begin_pool_routing() override {
    // As the allocator: a pool whose count reached zero is gone for good.
    TORCH_INTERNAL_ASSERT(books_.pool_use_count > 0, "use_count > 0 INTERNAL ASSERT FAILED");
    ++books_.pool_use_count;
    TORCH_CHECK(!books_.routing, "beginAllocateToPool: already recording to mempool_id");
    books_.routing = true;
  }
  void end_pool_routing() override {
    TORCH_CHECK(books_.routing, "endAllocatePool: not currently recording to mempool_id");
    books_.routing = false;
  }
  void release_pool() override {
    TORCH_INTERNAL_ASSERT(books_.pool_use_count > 0, "releasePool: use count below zero");
    --books_.pool_use_count;
  }
  void begin_capture() override {
    TORCH_CHECK(!books_.refuse_begin, "operation not permitted when stream is capturing");
    TORCH_CHECK(!books_.capturing, "the stream is already capturing");
    books_.capturing = true;
    TORCH_CHECK(!books_.fail_after_begin, "cudaStreamGetCaptureInfo: invalid resource handle");
  }
  bool end_capture() noexcept override {
    if (!books_.capturing) return false;
    books_.capturing = false;
    if (books_.invalidate) return false;
    ++books_.graphs;
    has_graph_ = true;
    return true;
  }
  void instantiate() override {
    TORCH_CHECK(!books_.refuse_instantiate, "cudaGraphInstantiate: invalid value");
  }
  void launch() override { ++books_.launches; }
  void discard_graph() noexcept override {
    if (has_graph_) --books_.graphs;
    has_graph_ = false;
  }
  std::string sticky_error() noexcept override { return books_.sticky; }

 private:
  Books& books_;
  bool has_graph_ = false;
};

std::unique_ptr<GraphRecorder> recorder(Books& books) {
  return std::make_unique<GraphRecorder>(std::make_unique<BookkeepingDevice>(books));
}

void expect_as_found(const Books& books) {
  EXPECT_EQ(books.pool_use_count, 1);
  EXPECT_FALSE(books.routing);
  EXPECT_FALSE(books.capturing);
  EXPECT_EQ(books.graphs, 0);
}

TEST(GraphRecorder, TwoSuccessiveCapturesLeaveThePoolAsFound) {
  Books books;
  for (int round = 0; round < 2; ++round) {
    auto graph = recorder(books);
    int ran = 0;
    graph->record([&] {
      EXPECT_TRUE(books.capturing);
      EXPECT_TRUE(books.routing);
      ++ran;
    });
    EXPECT_TRUE(graph->recorded());
    EXPECT_EQ(ran, 1);
    EXPECT_FALSE(books.routing);        // routing ends with the capture
    EXPECT_EQ(books.pool_use_count, 2); // the graph holds the pool
    graph->replay();
    graph->replay();
  }
  EXPECT_EQ(books.launches, 4);
  expect_as_found(books);
}

TEST(GraphRecorder, RefusedStepThenASuccessfulCapture) {
  Books books;
  {
    auto graph = recorder(books);
    EXPECT_THROW(graph->record([] { TORCH_CHECK(false, "operation not permitted"); }), c10::Error);
    EXPECT_FALSE(graph->recorded());
    EXPECT_FALSE(books.capturing); // the capture was ended on the failure path
    EXPECT_FALSE(books.routing);
  }
  expect_as_found(books);
  {
    auto graph = recorder(books);
    graph->record([] {});
    graph->replay();
  }
  EXPECT_EQ(books.launches, 1);
  expect_as_found(books);
}

TEST(GraphRecorder, RefusedBeginCapture) {
  Books books;
  books.refuse_begin = true;
  EXPECT_THROW(recorder(books)->record([] { FAIL() << "the step must not run"; }), c10::Error);
  expect_as_found(books);
}

// cudaStreamBeginCapture succeeded and the next call failed: the lane must
// not be left capturing (every later launch on it would fail).
TEST(GraphRecorder, FailureAfterTheCaptureBeganEndsTheCapture) {
  Books books;
  books.fail_after_begin = true;
  EXPECT_THROW(recorder(books)->record([] { FAIL() << "the step must not run"; }), c10::Error);
  expect_as_found(books);
}

TEST(GraphRecorder, InvalidatedCaptureIsARefusal) {
  Books books;
  books.invalidate = true;
  EXPECT_THROW(recorder(books)->record([] {}), c10::Error);
  expect_as_found(books);
}

TEST(GraphRecorder, RefusedInstantiation) {
  Books books;
  books.refuse_instantiate = true;
  EXPECT_THROW(recorder(books)->record([] {}), c10::Error);
  expect_as_found(books);
}

TEST(GraphRecorder, StickyDeviceErrorIsAFaultNotARefusal) {
  Books books;
  books.sticky = "an illegal memory access was encountered";
  try {
    recorder(books)->record([] { TORCH_CHECK(false, "launch failed"); });
    FAIL() << "expected a device fault";
  } catch (const torch_ar::StepGraphDeviceFault& e) {
    EXPECT_NE(std::string(e.what()).find("illegal memory access"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("launch failed"), std::string::npos);
  }
  expect_as_found(books);
}

TEST(GraphRecorder, NonTorchExceptionsPassThroughAfterCleanUp) {
  Books books;
  EXPECT_THROW(recorder(books)->record([] { throw std::bad_alloc(); }), std::bad_alloc);
  expect_as_found(books);
}

TEST(GraphRecorder, ManyCapturesNeverDropTheLastingReference) {
  // The defect this class replaces: each graph released a reference it had
  // never taken, so the second capture's new reference hit a zero count.
  Books books;
  for (int round = 0; round < 10; ++round) {
    auto graph = recorder(books);
    if (round % 3 == 1) {
      EXPECT_THROW(graph->record([] { TORCH_CHECK(false, "refused"); }), c10::Error);
    } else {
      graph->record([] {});
    }
  }
  expect_as_found(books);
}

} // namespace
