// A minimal module that every pipeline below could run on.
module {
  func.func public @main(%arg0: tensor<4xf32>) -> tensor<4xf32> attributes {sgdgen.state_count = 0 : i64} {
    %0 = stablehlo.negate %arg0 : tensor<4xf32>
    return %0 : tensor<4xf32>
  }
}
