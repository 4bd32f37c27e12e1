// Build facts only the nvcc host pass knows: the target architectures and the CUDA runtime version.
#include <cuda_runtime_api.h>

#include <vector>

namespace elit {

std::vector<int> cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return {__CUDA_ARCH_LIST__};
#else
  return {};
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace elit
