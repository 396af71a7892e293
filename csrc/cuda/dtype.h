// The logits' storage type, as the torch-free launchers see it.
#pragma once

namespace calibkernels {

enum class DType : int { Float32, Float16, BFloat16, Float64 };

}  // namespace calibkernels
