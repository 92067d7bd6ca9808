// RUN: sgdgen-opt %s --split-input-file --pass-pipeline='builtin.module(sgd-fuse-step)' | filecheck %s

/// Every func.call in @main is replaced by the callee's body, in call order; a call with
/// two results is rewired result by result; the inlined stage functions are erased.

// CHECK-LABEL: module @inlines_calls_and_erases_stages
// CHECK-NOT:     func.func private
// CHECK:         func.func public @main(%[[W:.*]]: tensor<4xf32>, %[[G:.*]]: tensor<4xf32>, %[[S:.*]]: tensor<f32>, %[[LR:.*]]: tensor<f32>)
// CHECK-NEXT:      %[[S_B:.*]] = stablehlo.broadcast_in_dim %[[S]], dims = [] : (tensor<f32>) -> tensor<4xf32>
// CHECK-NEXT:      %[[CLIPPED:.*]] = stablehlo.multiply %[[G]], %[[S_B]] : tensor<4xf32>
// CHECK-NEXT:      %[[LR_B:.*]] = stablehlo.broadcast_in_dim %[[LR]], dims = [] : (tensor<f32>) -> tensor<4xf32>
// CHECK-NEXT:      %[[NEG:.*]] = stablehlo.negate %[[CLIPPED]] : tensor<4xf32>
// CHECK-NEXT:      %[[STEP:.*]] = stablehlo.multiply %[[NEG]], %[[LR_B]] : tensor<4xf32>
// CHECK-NEXT:      %[[NEW_W:.*]] = stablehlo.add %[[W]], %[[STEP]] : tensor<4xf32>
// CHECK-NEXT:      return %[[NEW_W]], %[[STEP]] : tensor<4xf32>, tensor<4xf32>
// CHECK-NEXT:    }
// CHECK-NEXT:  }
module @inlines_calls_and_erases_stages {
  func.func private @global_clip_apply_4xf32(%g: tensor<4xf32>, %scale: tensor<f32>) -> tensor<4xf32> attributes {sgdgen.stage = "global_clip_apply"} {
    %scale_b = stablehlo.broadcast_in_dim %scale, dims = [] : (tensor<f32>) -> tensor<4xf32>
    %clipped = stablehlo.multiply %g, %scale_b : tensor<4xf32>
    return %clipped : tensor<4xf32>
  }
  func.func private @update_plain_4xf32(%w: tensor<4xf32>, %g: tensor<4xf32>, %lr: tensor<f32>) -> (tensor<4xf32>, tensor<4xf32>) attributes {sgdgen.stage = "update_plain"} {
    %lr_b = stablehlo.broadcast_in_dim %lr, dims = [] : (tensor<f32>) -> tensor<4xf32>
    %neg = stablehlo.negate %g : tensor<4xf32>
    %step = stablehlo.multiply %neg, %lr_b : tensor<4xf32>
    %new_w = stablehlo.add %w, %step : tensor<4xf32>
    return %new_w, %step : tensor<4xf32>, tensor<4xf32>
  }
  func.func public @main(%w: tensor<4xf32>, %g: tensor<4xf32>, %scale: tensor<f32>, %lr: tensor<f32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %clipped = func.call @global_clip_apply_4xf32(%g, %scale) : (tensor<4xf32>, tensor<f32>) -> tensor<4xf32>
    %new:2 = func.call @update_plain_4xf32(%w, %clipped, %lr) : (tensor<4xf32>, tensor<4xf32>, tensor<f32>) -> (tensor<4xf32>, tensor<4xf32>)
    return %new#0, %new#1 : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

/// Variables of one class share one stage function: each call site gets its own copy
/// of the body (on its own operands), and the function is erased once.

// CHECK-LABEL: module @inlines_shared_stage_at_every_call
// CHECK-NOT:     @weight_decay_4xf32
// CHECK:         func.func public @main(%[[A:.*]]: tensor<4xf32>, %[[B:.*]]: tensor<4xf32>)
// CHECK-NEXT:      %[[CA:.*]] = stablehlo.constant dense<9.990000e-01> : tensor<4xf32>
// CHECK-NEXT:      %[[DA:.*]] = stablehlo.multiply %[[A]], %[[CA]] : tensor<4xf32>
// CHECK-NEXT:      %[[CB:.*]] = stablehlo.constant dense<9.990000e-01> : tensor<4xf32>
// CHECK-NEXT:      %[[DB:.*]] = stablehlo.multiply %[[B]], %[[CB]] : tensor<4xf32>
// CHECK-NEXT:      return %[[DA]], %[[DB]]
// CHECK-NOT:     @weight_decay_4xf32
module @inlines_shared_stage_at_every_call {
  func.func private @weight_decay_4xf32(%w: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "weight_decay"} {
    %keep = stablehlo.constant dense<0.999> : tensor<4xf32>
    %decayed = stablehlo.multiply %w, %keep : tensor<4xf32>
    return %decayed : tensor<4xf32>
  }
  func.func public @main(%a: tensor<4xf32>, %b: tensor<4xf32>) -> (tensor<4xf32>, tensor<4xf32>) {
    %da = func.call @weight_decay_4xf32(%a) : (tensor<4xf32>) -> tensor<4xf32>
    %db = func.call @weight_decay_4xf32(%b) : (tensor<4xf32>) -> tensor<4xf32>
    return %da, %db : tensor<4xf32>, tensor<4xf32>
  }
}

// -----

/// Only functions that @main calls are inlined and erased; any other function is left
/// for symbol-dce.

// CHECK-LABEL: module @keeps_uncalled_functions
// CHECK:         func.func private @unused_4xf32
// CHECK-NOT:     func.func private @negate_4xf32
// CHECK:         func.func public @main(%[[A:.*]]: tensor<4xf32>)
// CHECK-NEXT:      %[[N:.*]] = stablehlo.negate %[[A]] : tensor<4xf32>
// CHECK-NEXT:      return %[[N]]
module @keeps_uncalled_functions {
  func.func private @unused_4xf32(%x: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "weight_decay"} {
    return %x : tensor<4xf32>
  }
  func.func private @negate_4xf32(%x: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "update_plain"} {
    %n = stablehlo.negate %x : tensor<4xf32>
    return %n : tensor<4xf32>
  }
  func.func public @main(%a: tensor<4xf32>) -> tensor<4xf32> {
    %n = func.call @negate_4xf32(%a) : (tensor<4xf32>) -> tensor<4xf32>
    return %n : tensor<4xf32>
  }
}

// -----

/// A step without norm partials (plain SGD) is inlined and gets no norm tags at all.

// CHECK-LABEL: module @no_partials_no_tags
// CHECK-NOT:     sgdgen.norm
// CHECK:         return
module @no_partials_no_tags {
  func.func private @negate_4xf32(%x: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "update_plain"} {
    %n = stablehlo.negate %x : tensor<4xf32>
    return %n : tensor<4xf32>
  }
  func.func public @main(%a: tensor<4xf32>) -> tensor<4xf32> {
    %n = func.call @negate_4xf32(%a) : (tensor<4xf32>) -> tensor<4xf32>
    return %n : tensor<4xf32>
  }
}
