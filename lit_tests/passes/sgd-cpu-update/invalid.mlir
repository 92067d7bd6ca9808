// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-update{min-elements=-1})' 2>&1 | filecheck %s --check-prefix=NEGATIVE
// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-update{min-elements=all})' 2>&1 | filecheck %s --check-prefix=WORD
// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-cpu-update{clip=1})' 2>&1 | filecheck %s --check-prefix=UNKNOWN

/// A bad option is an error naming it, before anything is rewritten.
// NEGATIVE: error: sgd-cpu-update: min-elements must be a non-negative integer, got '-1'
// WORD: error: sgd-cpu-update: min-elements must be a non-negative integer, got 'all'
// UNKNOWN: unknown or empty option 'clip=1'; it takes min-elements
module @bad_option {
  func.func public @main(%g: tensor<4xf32>) -> tensor<4xf32> {
    return %g : tensor<4xf32>
  }
}
