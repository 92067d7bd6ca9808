// RUN: not sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-fuse-step)' 2>&1 | filecheck %s

/// Input the pass cannot fuse is reported as an MLIR diagnostic naming the pass, and
/// sgdgen-opt exits non-zero; never a Python traceback or an "internal error". The
/// ops an error points at carry named locations (loc("...")), so each CHECK pins
/// where the diagnostic is reported.

/// No @main: nothing says which function is the step.
// CHECK: no_main: error: sgd-fuse-step: the module has no @main function; run it on a module that sgdgen emit produced
module @no_main {
  func.func public @step(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    return %arg0 : tensor<4xf32>
  }
} loc("no_main")

// -----

/// A call to a function the module does not define never reaches the pass: the
/// func.call verifier rejects the module when it is parsed.
// CHECK: call_undefined: error: 'func.call' op 'nowhere' does not reference a valid function
module @call_undefined {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = func.call @nowhere(%arg0) : (tensor<4xf32>) -> tensor<4xf32> loc("call_undefined")
    return %0 : tensor<4xf32>
  }
}

// -----

/// Already partitioned (a stage-1 module): fusing must come before sgd-insert-collectives.
// CHECK: partitioned_main: error: sgd-fuse-step: @main is already partitioned (sdy.manual_computation); run sgd-fuse-step before sgd-insert-collectives
module @already_partitioned {
  sdy.mesh @mesh = <["model"=4]>
  func.func public @main(%arg0: tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) -> (tensor<16xf32> {sdy.sharding = #sdy.sharding<@mesh, [{"model"}]>}) {
    %0 = sdy.manual_computation(%arg0) in_shardings=[<@mesh, [{"model"}]>] out_shardings=[<@mesh, [{"model"}]>] manual_axes={"model"} (%arg1: tensor<4xf32>) {
      %1 = stablehlo.negate %arg1 : tensor<4xf32>
      sdy.return %1 : tensor<4xf32>
    } : (tensor<16xf32>) -> tensor<16xf32>
    return %0 : tensor<16xf32>
  } loc("partitioned_main")
}

// -----

/// Stage functions are straight-line: one that calls another is not inlined.
// CHECK: nested_stage: error: sgd-fuse-step: @outer_4xf32 calls another function; stage functions must be straight-line
module @stage_calls_stage {
  func.func private @inner_4xf32(%x: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "weight_decay"} {
    %n = stablehlo.negate %x : tensor<4xf32>
    return %n : tensor<4xf32>
  }
  func.func private @outer_4xf32(%x: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "update_plain"} {
    %n = func.call @inner_4xf32(%x) : (tensor<4xf32>) -> tensor<4xf32>
    return %n : tensor<4xf32>
  } loc("nested_stage")
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = func.call @outer_4xf32(%arg0) : (tensor<4xf32>) -> tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}

// -----

/// A norm partial must compute a value: one that returns its argument leaves no op to tag.
// CHECK: identity_partial: error: sgd-fuse-step: norm partial @identity_f32 returns its argument; it must compute a value
module @partial_returns_argument {
  func.func private @identity_f32(%x: tensor<f32>) -> tensor<f32> attributes {sgdgen.stage = "norm_partial"} {
    return %x : tensor<f32>
  } loc("identity_partial")
  func.func public @main(%arg0: tensor<f32>) -> tensor<f32> {
    %0 = func.call @identity_f32(%arg0) : (tensor<f32>) -> tensor<f32>
    return %0 : tensor<f32>
  }
}
