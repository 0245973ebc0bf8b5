// The selective scan for training on the device (cuda_kernels.h): the kernels of scan_train_block.h
// (where the algorithm is described) launched, and Mamba-2's SSD in the same recurrent form.
// ssd_train_backward picks its form here: the chunked one (ssd_train.cu) wherever its tiles fit.
#include "cuda_common.cuh"
#include "cuda_kernels.h"
#include "scan_train_block.h"

namespace mssm::cuda {
namespace {

using detail::ceil_div;
using namespace scan_train;

template <int J, bool kSsd>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_forward_kernel(ScanView v, TrainTensors t, float* y, float* boundary) {
  scan_forward_block<J, kSsd>(v, t, y, boundary, blockIdx.x);
}

template <int J, bool kSsd>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
    scan_backward_kernel(ScanView v, TrainTensors t, const float* boundary, const float* dy, TrainGrads gr,
                         float* states) {
  scan_backward_block<J, kSsd>(v, t, boundary, dy, gr, states, blockIdx.x);
}

Status check(const train::ScanArgs& a, int64_t head_dim, const char* op, ScanView* v) {
  if (a.batch < 1 || a.length < 1 || a.channels < 1 || a.state < 1)
    return detail::error(op, "batch, length, channels and state must be at least 1");
  const int64_t units = head_dim ? a.channels / head_dim : a.channels;  // what the groups split: heads or channels
  if (a.groups < 1 || units % a.groups != 0)
    return detail::error(op, "groups " + std::to_string(a.groups) + " does not divide " +
                                 (head_dim ? "heads " : "channels ") + std::to_string(units));
  if (a.chunk < 1) return detail::error(op, "chunk must be at least 1");
  if (a.state > 256) return detail::error(op, "state sizes above 256 are not supported on the device");
  *v = ScanView{a.batch, a.length, a.channels, a.state, a.groups, a.chunk, ceil_div(a.length, a.chunk),
                a.softplus, (float)a.dt_min, (float)a.dt_max, head_dim};
  return {};
}

// Launches the kernel for the register layout that holds `state` values per warp (with_layout).
template <bool kSsd>
void launch_forward(const ScanView& v, const TrainTensors& t, float* y, float* boundary, cudaStream_t stream) {
  const unsigned blocks = (unsigned)ceil_div(v.batch * v.channels, kWarpsPerBlock), threads = 32 * kWarpsPerBlock;
  with_layout(v.state, [&](auto J) {
    scan_forward_kernel<decltype(J)::value, kSsd><<<blocks, threads, 0, stream>>>(v, t, y, boundary);
  });
}
template <bool kSsd>
void launch_backward(const ScanView& v, const TrainTensors& t, const float* boundary, const float* dy,
                     const TrainGrads& g, float* states, cudaStream_t stream) {
  const unsigned blocks = (unsigned)ceil_div(v.batch * v.channels, kWarpsPerBlock), threads = 32 * kWarpsPerBlock;
  with_layout(v.state, [&](auto J) {
    scan_backward_kernel<decltype(J)::value, kSsd><<<blocks, threads, 0, stream>>>(v, t, boundary, dy, g, states);
  });
}

// The SSD's arguments as the scan's over its expanded channels (heads · head_dim).
train::ScanArgs expanded(const train::SsdTrainArgs& a) {
  train::ScanArgs s;
  s.batch = a.batch, s.length = a.length, s.channels = a.heads * a.head_dim, s.state = a.state;
  s.groups = a.groups, s.chunk = a.chunk, s.softplus = a.softplus, s.dt_min = a.dt_min, s.dt_max = a.dt_max;
  return s;
}

size_t workspace_bytes(const train::ScanArgs& a) {
  return (size_t)(a.batch * a.channels * std::min(a.chunk, a.length) * a.state) * sizeof(float);
}

// dB, dC (and the SSD's ddt) are (=) outputs made of atomic sums: zeroed first.
Status zero_sums(const train::ScanArgs& a, float* dB, float* dC, float* ddt, int64_t heads, cudaStream_t stream,
                 const char* op) {
  const size_t bc_bytes = (size_t)(a.batch * a.length * a.groups * a.state) * sizeof(float);
  MSSM_CUDA_TRY(op, cudaMemsetAsync(dB, 0, bc_bytes, stream));
  MSSM_CUDA_TRY(op, cudaMemsetAsync(dC, 0, bc_bytes, stream));
  if (ddt) MSSM_CUDA_TRY(op, cudaMemsetAsync(ddt, 0, (size_t)(a.batch * a.length * heads) * sizeof(float), stream));
  return {};
}

}  // namespace

Status scan_train_forward(const train::ScanArgs& a, const train::ScanTensors<float>& t, float* y, float* boundary,
                          cudaStream_t stream) {
  const char* op = "scan_train_forward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, 0, op, &v));
  launch_forward<false>(v, TrainTensors{t.u, t.delta, t.A, t.B, t.C, t.D, t.z, t.delta_bias}, y, boundary, stream);
  return detail::check_launch(op);
}

size_t scan_train_backward_workspace_bytes(const train::ScanArgs& a) { return workspace_bytes(a); }

Status scan_train_backward(const train::ScanArgs& a, const train::ScanTensors<float>& t, const float* boundary,
                           const float* dy, const train::ScanGrads<float>& g, void* workspace, cudaStream_t stream) {
  const char* op = "scan_train_backward";
  ScanView v;
  MSSM_STATUS_TRY(check(a, 0, op, &v));
  if (!g.du || !g.ddelta || !g.dA || !g.dB || !g.dC) return detail::error(op, "du, ddelta, dA, dB and dC are required");
  if (!workspace) return detail::error(op, "a workspace of scan_train_backward_workspace_bytes() is required");
  MSSM_STATUS_TRY(zero_sums(a, g.dB, g.dC, nullptr, 0, stream, op));
  // As the CPU's: dD, dz and ddelta_bias are skipped when null, and ignored when D, z or delta_bias is.
  launch_backward<false>(v, TrainTensors{t.u, t.delta, t.A, t.B, t.C, t.D, t.z, t.delta_bias}, boundary, dy,
                         TrainGrads{g.du, g.ddelta, g.dA, g.dB, g.dC, t.D ? g.dD : nullptr, t.z ? g.dz : nullptr,
                                    t.delta_bias ? g.ddelta_bias : nullptr},
                         static_cast<float*>(workspace), stream);
  return detail::check_launch(op);
}

Status ssd_train_forward(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, float* y,
                         float* boundary, cudaStream_t stream) {
  const char* op = "ssd_train_forward";
  if (a.heads < 1 || a.head_dim < 1) return detail::error(op, "heads and head_dim must be at least 1");
  const train::ScanArgs s = expanded(a);
  ScanView v;
  MSSM_STATUS_TRY(check(s, a.head_dim, op, &v));
  launch_forward<true>(v, TrainTensors{t.x, t.dt, t.A, t.B, t.C, t.D, nullptr, t.dt_bias}, y, boundary, stream);
  return detail::check_launch(op);
}

size_t ssd_train_backward_workspace_bytes(const train::SsdTrainArgs& a, SsdBackwardForm form) {
  if (a.batch < 1 || a.length < 1 || a.heads < 1 || a.head_dim < 1 || a.state < 1 || a.chunk < 1) return 0;
  const size_t recurrent = workspace_bytes(expanded(a)), chunked = detail::ssd_backward_chunked_workspace_bytes(a);
  switch (form) {
    case SsdBackwardForm::recurrent: return recurrent;
    case SsdBackwardForm::chunked: return chunked;
    default: return std::max(recurrent, chunked);
  }
}

SsdBackwardForm ssd_train_backward_form(const train::SsdTrainArgs& a, SsdMath math) {
  if (a.batch < 1 || a.length < 1 || a.heads < 1 || a.head_dim < 1 || a.state < 1 || a.chunk < 1)
    return SsdBackwardForm::recurrent;
  return detail::ssd_backward_chunked_tile(a, math) > 0 ? SsdBackwardForm::chunked : SsdBackwardForm::recurrent;
}

Status ssd_train_backward(const train::SsdTrainArgs& a, const train::SsdTrainTensors<float>& t, const float* boundary,
                          const float* dy, const train::SsdTrainGrads<float>& g, void* workspace, cudaStream_t stream,
                          SsdBackwardForm form, SsdMath math) {
  const char* op = "ssd_train_backward";
  if (a.heads < 1 || a.head_dim < 1) return detail::error(op, "heads and head_dim must be at least 1");
  const train::ScanArgs s = expanded(a);
  ScanView v;
  MSSM_STATUS_TRY(check(s, a.head_dim, op, &v));
  if (!g.dx || !g.ddt || !g.dA || !g.dB || !g.dC) return detail::error(op, "dx, ddt, dA, dB and dC are required");
  if (!workspace) return detail::error(op, "a workspace of ssd_train_backward_workspace_bytes() is required");
  const int tile = form == SsdBackwardForm::recurrent ? 0 : detail::ssd_backward_chunked_tile(a, math);
  if (form == SsdBackwardForm::chunked && tile == 0)
    return detail::error(op, "the chunked form's tiles (chunk " + std::to_string(a.chunk) + ", head_dim " +
                                 std::to_string(a.head_dim) + ", state " + std::to_string(a.state) +
                                 ") do not fit this device's shared memory; use the recurrent form");
  // The chunked form writes every ddt itself; the recurrent one sums it atomically over a head's channels.
  MSSM_STATUS_TRY(zero_sums(s, g.dB, g.dC, tile > 0 ? nullptr : g.ddt, a.heads, stream, op));
  if (tile > 0) return detail::ssd_backward_chunked(a, t, boundary, dy, g, math, tile, workspace, stream);
  // dD and ddt_bias are ignored when D and dt_bias are null (ssd_chunked.h).
  launch_backward<true>(v, TrainTensors{t.x, t.dt, t.A, t.B, t.C, t.D, nullptr, t.dt_bias}, boundary, dy,
                        TrainGrads{g.dx, g.ddt, g.dA, g.dB, g.dC, t.D ? g.dD : nullptr, nullptr,
                                   t.dt_bias ? g.ddt_bias : nullptr},
                        static_cast<float*>(workspace), stream);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
