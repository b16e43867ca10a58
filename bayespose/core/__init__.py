"""The science of bayespose: torch/numpy only. Nothing under this package imports pyworkflow or pwem."""
