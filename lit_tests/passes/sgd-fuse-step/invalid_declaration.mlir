// RUN: not sgdgen-opt %s --pass-pipeline='builtin.module(sgd-fuse-step)' 2>&1 | filecheck %s

/// BUG (sgd-fuse-step): a call to a function that is only declared (no body) crashes
/// inside the pass: `_inline_calls` reads `body_ops(callee)`, i.e. the first block of
/// an empty region, and the IndexError surfaces as
///   `error: sgd-fuse-step: internal error: IndexError: attempt to access out of bounds block`
/// at the module. Expected: an ordinary diagnostic at the call (like the one for an
/// undefined callee) that names the declaration, and no "internal error".
/// Remove the XFAIL line once the pass reports it.

/// A stage must have a body to be inlined; a bare declaration is bad input, reported at the call.
// CHECK: call_declaration: error: sgd-fuse-step: {{.*}}@ext_4xf32
// CHECK-NOT: internal error
module @call_declaration {
  func.func private @ext_4xf32(tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.stage = "update_plain"}
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> {
    %0 = func.call @ext_4xf32(%arg0) : (tensor<4xf32>) -> tensor<4xf32> loc("call_declaration")
    return %0 : tensor<4xf32>
  }
}
