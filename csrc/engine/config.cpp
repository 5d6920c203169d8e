#include "engine/config.h"

#include <c10/util/Exception.h>

namespace torch_ar {

InitMode parse_init(const std::string& name) {
  if (name == "forward") return InitMode::Forward;
  if (name == "zero") return InitMode::Zero;
  TORCH_CHECK(false, "torch_ar: init must be 'forward' or 'zero', got '", name, "'");
}

Schedule parse_schedule(const std::string& name) {
  if (name == "jacobi") return Schedule::Jacobi;
  if (name == "sweep") return Schedule::Sweep;
  TORCH_CHECK(false, "torch_ar: schedule must be 'jacobi' or 'sweep', got '", name, "'");
}

Granularity parse_granularity(const std::string& name) {
  if (name == "layer") return Granularity::Layer;
  if (name == "block") return Granularity::Block;
  if (name == "op") return Granularity::Op;
  TORCH_CHECK(false, "torch_ar: granularity must be 'layer', 'block' or 'op', got '", name, "'");
}

Evaluation parse_evaluation(const std::string& name) {
  if (name == "auto") return Evaluation::Auto;
  if (name == "closed_form") return Evaluation::ClosedForm;
  if (name == "literal") return Evaluation::Literal;
  TORCH_CHECK(false, "torch_ar: evaluation must be 'auto', 'closed_form' or 'literal', got '", name,
              "'");
}

bool EngineConfig::may_evaluate_layers_repeatedly() const {
  return !(eta == 1.0 && exact_rule() && steps < 0 && tol < 0 && !trace && !trace_cosine);
}

bool EngineConfig::needs_forward_values() const {
  const bool literal = eta != 1.0 || trace || trace_cosine || tol >= 0 || steps >= 0;
  return init == InitMode::Forward && literal;
}

bool EngineConfig::asks_for_relaxation() const {
  return !(exact_rule() && eta == 1.0 && steps < 0 && tol < 0);
}

const std::vector<std::string>& engine_option_names() {
  static const std::vector<std::string> names = {
#define TORCH_AR_OPTION_NAME(name, type, default_value) #name,
      TORCH_AR_ENGINE_OPTIONS(TORCH_AR_OPTION_NAME)
#undef TORCH_AR_OPTION_NAME
  };
  return names;
}

} // namespace torch_ar
