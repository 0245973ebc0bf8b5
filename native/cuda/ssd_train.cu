// Launches of the chunked SSD backward for training (ssd_backward_block.h holds the kernels' bodies and
// the algorithm): the workspace, the choice of the state tile, and the four kernels in order.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_common.cuh"
#include "ssd_backward_block.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;
using namespace ssd_backward;

__global__ void prepare_kernel(View v) {
  const int64_t item = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (item < v.items()) prepare_item(v, item);
}

// wmma needs 32-byte aligned tiles: the layouts align every buffer to 128 bytes from this base.
template <typename T>
__global__ void __launch_bounds__(kThreads) dstate_kernel(View v) {
  extern __shared__ __align__(128) char dstate_shared[];
  dstate_block<T>(v, blockIdx.x, dstate_shared);
}

__global__ void dstate_pass_kernel(View v) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < v.batch * v.H * v.P * v.N) dstate_pass_element(v, i);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(View v) {
  extern __shared__ __align__(128) char backward_shared[];
  backward_block<T>(v, blockIdx.x, backward_shared);
}

template <typename T>
size_t shared_bytes(const Sizes& z, int Nt) {
  return std::max(back_layout<T>(z.Qp, z.Pp, Nt).total, dstate_layout<T>(z.Qp, z.Pp, Nt).total);
}

template <typename T>
Status launch(const View& v, cudaStream_t stream) {
  const char* op = "ssd_train_backward";
  const size_t shared_back = back_layout<T>(v.Qp, v.Pp, v.Nt).total;
  const size_t shared_dstate = dstate_layout<T>(v.Qp, v.Pp, v.Nt).total;
  MSSM_CUDA_TRY(op, cudaFuncSetAttribute(dstate_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)shared_dstate));
  MSSM_CUDA_TRY(op, cudaFuncSetAttribute(backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)shared_back));
  const int64_t items = v.items(), elements = v.batch * v.H * v.P * v.N;
  prepare_kernel<<<(unsigned)ceil_div(items, 128), 128, 0, stream>>>(v);
  MSSM_STATUS_TRY(detail::check_launch(op));
  dstate_kernel<T><<<(unsigned)items, kThreads, shared_dstate, stream>>>(v);
  MSSM_STATUS_TRY(detail::check_launch(op));
  dstate_pass_kernel<<<(unsigned)ceil_div(elements, 256), 256, 0, stream>>>(v);
  MSSM_STATUS_TRY(detail::check_launch(op));
  backward_kernel<T><<<(unsigned)items, kThreads, shared_back, stream>>>(v);
  return detail::check_launch(op);
}

}  // namespace

namespace detail {

int ssd_backward_chunked_tile(const train::SsdTrainArgs& a, SsdMath math) {
  // One block per item and one thread per state element of every (sequence, head): both grids must fit.
  if (items_of(a) > 0x7fffffff || ceil_div(a.batch * a.heads * a.head_dim * a.state, 256) > 0x7fffffff) return 0;
  const Sizes z = sizes_of(a);
  const size_t limit = (size_t)shared_limit();
  for (int Nt : {z.Np, 64, 32, 16}) {
    if (Nt > z.Np) continue;
    const size_t need = math == SsdMath::fp32 ? shared_bytes<float>(z, Nt) : shared_bytes<__nv_bfloat16>(z, Nt);
    if (need <= limit) return Nt;
  }
  return 0;
}

size_t ssd_backward_chunked_workspace_bytes(const train::SsdTrainArgs& a) {
  return workspace_layout(items_of(a), sizes_of(a).Qp, a.head_dim, a.state).total;
}

Status ssd_backward_chunked(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, const float* boundary,
                            const float* dy, const train::SsdTrainGrads<float>& g, SsdMath math, int Nt,
                            void* workspace, cudaStream_t stream) {
  const View v = make_view(a, t, boundary, dy, g, Nt, static_cast<char*>(workspace));
  return math == SsdMath::fp32 ? launch<float>(v, stream) : launch<__nv_bfloat16>(v, stream);
}

}  // namespace detail
}  // namespace mssm::cuda
