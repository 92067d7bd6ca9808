// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-kernels{min-elements=-1})' 2>&1 | filecheck %s --check-prefix=NEGATIVE
// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-kernels{min-elements=many})' 2>&1 | filecheck %s --check-prefix=WORD
// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-kernels{threshold=5})' 2>&1 | filecheck %s --check-prefix=UNKNOWN

/// A bad option is an error naming it, before anything is rewritten.
// NEGATIVE: error: sgd-cpu-kernels: min-elements must be a non-negative integer, got '-1'
// WORD: error: sgd-cpu-kernels: min-elements must be a non-negative integer, got 'many'
// UNKNOWN: unknown or empty option 'threshold=5'; it takes min-elements
module @bad_option {
  func.func public @main(%g: tensor<4xf32>) -> tensor<4xf32> {
    return %g : tensor<4xf32>
  }
}
