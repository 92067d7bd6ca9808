// RUN: not sgdgen-opt %s --split-input-file 2>&1 | filecheck %s

/// Diagnostics in a chunk of --split-input-file give the line and column in the file,
/// as mlir-opt's do, not the line within the chunk. (The Python filecheck has no
/// [[@LINE]], so the lines are written out: the bad op is on line 19, the return on 29;
/// tests/test_opt.py checks the same with the line computed.)

module @first {
  func.func @f(%a: tensor<f32>) -> tensor<f32> {
    return %a : tensor<f32>
  }
}

// -----

module @second {
  func.func @g(%a: tensor<f32>) -> tensor<f32> {
    // CHECK: split_input_file_lines.mlir:19:10: error: {{.*}}stablehlo.no_such_op
    %0 = stablehlo.no_such_op %a : tensor<f32>
    return %0 : tensor<f32>
  }
}

// -----

module @third {
  func.func @h(%a: tensor<f32>) -> tensor<i32> {
    // CHECK: split_input_file_lines.mlir:29:5: error: {{.*}}type of return operand 0
    return %a : tensor<f32>
  }
}
