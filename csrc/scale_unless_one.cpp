// calibkernels::scale_unless_one_ on the CPU: t *= scale, skipped when the scalar is 1 (read on
// the host here; the CUDA kernel reads it on the device). Gradients computed in the forward use it
// to apply grad_output with no pass at all for a plain loss.backward().
#include <torch/library.h>

#include <ATen/ATen.h>

namespace calibkernels {
namespace {

void scale_unless_one_cpu(const at::Tensor& t, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(scale.numel() == 1 && at::isFloatingType(scale.scalar_type()),
                    "scale_unless_one_: scale must hold one floating value, got shape ",
                    scale.sizes());
  if (scale.item<double>() == 1.0) return;
  at::AutoDispatchBelowADInplaceOrView guard;  // the buffer is the caller's own
  t.mul_(scale.to(t.scalar_type()).reshape({}));
}

}  // namespace

TORCH_LIBRARY_IMPL(calibkernels, CPU, m) { m.impl("scale_unless_one_", &scale_unless_one_cpu); }

}  // namespace calibkernels
