// RUN: not sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-alias-buffers)' 2>&1 | filecheck %s

/// A state argument that cannot be updated in place by its result is an error at
/// @main (named loc("main_*") below), never a silently skipped alias: the runtime
/// relies on every state buffer being aliased.

/// Without sgdgen.state_count nothing says which arguments are state.
// CHECK: main_no_count: error: sgd-alias-buffers: @main has no sgdgen.state_count attribute, so which arguments are state is unknown; emit the module with sgdgen emit
module @missing_state_count {
  func.func public @main(%w: tensor<4xf32>, %g: tensor<4xf32>) -> tensor<4xf32> {
    %0 = stablehlo.subtract %w, %g : tensor<4xf32>
    return %0 : tensor<4xf32>
  } loc("main_no_count")
}

// -----

/// More state than results: state argument 1 would have no result to alias.
// CHECK: main_count_too_big: error: sgd-alias-buffers: sgdgen.state_count = 2 but @main has 2 arguments and 1 results
module @state_count_larger_than_results {
  func.func public @main(%w: tensor<4xf32>, %g: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.state_count = 2 : i64} {
    %0 = stablehlo.subtract %w, %g : tensor<4xf32>
    return %0 : tensor<4xf32>
  } loc("main_count_too_big")
}

// -----

/// More state than arguments.
// CHECK: main_count_gt_args: error: sgd-alias-buffers: sgdgen.state_count = 3 but @main has 2 arguments and 3 results
module @state_count_larger_than_arguments {
  func.func public @main(%w: tensor<4xf32>, %g: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>, tensor<4xf32>) attributes {sgdgen.state_count = 3 : i64} {
    return %w, %g, %g : tensor<4xf32>, tensor<4xf32>, tensor<4xf32>
  } loc("main_count_gt_args")
}

// -----

/// Result 1 has another type than argument 1 (f64 vs f32): not an in-place update.
// CHECK: main_type_mismatch: error: sgd-alias-buffers: state argument 1 has type tensor<4xf32> but result 1 has type tensor<4xf64>; a buffer can only be updated in place by a value of its type
module @type_mismatch {
  func.func public @main(%i: tensor<i64>, %w: tensor<4xf32>) -> (tensor<i64>, tensor<4xf64>) attributes {sgdgen.state_count = 2 : i64} {
    %0 = stablehlo.convert %w : (tensor<4xf32>) -> tensor<4xf64>
    return %i, %0 : tensor<i64>, tensor<4xf64>
  } loc("main_type_mismatch")
}

// -----

/// Same type, other shape.
// CHECK: main_shape_mismatch: error: sgd-alias-buffers: state argument 0 has type tensor<4xf32> but result 0 has type tensor<2x2xf32>
module @shape_mismatch {
  func.func public @main(%w: tensor<4xf32>) -> tensor<2x2xf32> attributes {sgdgen.state_count = 1 : i64} {
    %0 = stablehlo.reshape %w : (tensor<4xf32>) -> tensor<2x2xf32>
    return %0 : tensor<2x2xf32>
  } loc("main_shape_mismatch")
}

// -----

/// Argument 0 sharded on "model", result 0 replicated: an in-place update keeps the layout.
// CHECK: main_sharding_mismatch: error: sgd-alias-buffers: state argument 0 is sharded as #sdy.sharding<@mesh, [{"model"}]> but result 0 as #sdy.sharding<@mesh, [{}]>; an in-place update keeps the layout
module @sharding_mismatch {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%w: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>})
      -> (tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{}]>}) attributes {sgdgen.state_count = 1 : i64} {
    return %w : tensor<16xf32>
  } loc("main_sharding_mismatch")
}

// -----

/// A sharding on one side only is a mismatch too.
// CHECK: main_sharding_one_side: error: sgd-alias-buffers: state argument 0 is sharded as #sdy.sharding<@mesh, [{"model"}]> but result 0 as {{.*}}; an in-place update keeps the layout
module @sharding_on_argument_only {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%w: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) -> tensor<16xf32>
      attributes {sgdgen.state_count = 1 : i64} {
    return %w : tensor<16xf32>
  } loc("main_sharding_one_side")
}

// -----

/// An argument already aliased to another result.
// CHECK: main_realias: error: sgd-alias-buffers: argument 0 is already aliased to result 1
module @already_aliased_elsewhere {
  func.func public @main(%w: tensor<4xf32> {tf.aliasing_output = 1 : i32}, %m: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>)
      attributes {sgdgen.state_count = 2 : i64} {
    return %w, %m : tensor<4xf32>, tensor<4xf32>
  } loc("main_realias")
}
