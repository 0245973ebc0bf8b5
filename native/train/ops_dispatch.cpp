// The public training ops of ops.h and ssd_chunked.h: each calls the table of the CPU level in use (see ops_table.h).
#include <type_traits>

#include "../core/cpu_features.h"
#include "ops_table.h"

namespace mssm::train {

namespace baseline { extern const TrainOpsTable ops_table; }
#if MSSM_HAVE_X86_LEVELS
namespace avx2 { extern const TrainOpsTable ops_table; }
namespace avx512 { extern const TrainOpsTable ops_table; }
namespace avx512bf16 { extern const TrainOpsTable ops_table; }
#endif

namespace {

const TrainOpsTable& table() {
  switch (current_cpu_level()) {
#if MSSM_HAVE_X86_LEVELS
    case CpuLevel::avx2: return avx2::ops_table;
    case CpuLevel::avx512: return avx512::ops_table;
    case CpuLevel::avx512bf16: return avx512bf16::ops_table;
#endif
    default: return baseline::ops_table;
  }
}

template <typename T>
const OpsFor<T>& ops() {
  if constexpr (std::is_same_v<T, float>) {
    return table().f32;
  } else {
    return table().f64;
  }
}

}  // namespace

template <typename T>
void rmsnorm_forward(const T* x, const T* w, T* out, T* rstd, int64_t rows, int64_t dim, T eps) {
  ops<T>().rmsnorm_forward(x, w, out, rstd, rows, dim, eps);
}
template <typename T>
void rmsnorm_backward(const T* dout, const T* x, const T* w, const T* rstd, T* dx, T* dw, int64_t rows, int64_t dim) {
  ops<T>().rmsnorm_backward(dout, x, w, rstd, dx, dw, rows, dim);
}
template <typename T>
void gated_rmsnorm_forward(const T* y, const T* z, const T* w, T* out, T* rstd, int64_t rows, int64_t dim,
                           int64_t group_size, T eps, bool norm_before_gate) {
  ops<T>().gated_rmsnorm_forward(y, z, w, out, rstd, rows, dim, group_size, eps, norm_before_gate);
}
template <typename T>
void gated_rmsnorm_backward(const T* dout, const T* y, const T* z, const T* w, const T* rstd, T* dy, T* dz, T* dw,
                            int64_t rows, int64_t dim, int64_t group_size, bool norm_before_gate) {
  ops<T>().gated_rmsnorm_backward(dout, y, z, w, rstd, dy, dz, dw, rows, dim, group_size, norm_before_gate);
}
template <typename T>
void conv1d_forward(const T* x, const T* w, const T* bias, T* y, int64_t batch, int64_t length, int64_t channels,
                    int64_t kernel, bool silu) {
  ops<T>().conv1d_forward(x, w, bias, y, batch, length, channels, kernel, silu);
}
template <typename T>
void conv1d_backward(const T* dy, const T* x, const T* w, const T* bias, T* dx, T* dw, T* dbias, int64_t batch,
                     int64_t length, int64_t channels, int64_t kernel, bool silu) {
  ops<T>().conv1d_backward(dy, x, w, bias, dx, dw, dbias, batch, length, channels, kernel, silu);
}
template <typename T>
void scan_forward(const ScanArgs& a, const ScanTensors<T>& t, T* y, T* boundary) {
  ops<T>().scan_forward(a, t, y, boundary);
}
template <typename T>
void scan_backward(const ScanArgs& a, const ScanTensors<T>& t, const T* boundary, const T* dy, const ScanGrads<T>& g) {
  ops<T>().scan_backward(a, t, boundary, dy, g);
}
template <typename T>
double cross_entropy(T* logits, const int32_t* targets, int64_t rows, int64_t vocab, T scale, int64_t* count) {
  return ops<T>().cross_entropy(logits, targets, rows, vocab, scale, count);
}
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  ops<T>().transpose(src, rows, cols, dst);
}
template <typename T>
void weight_grad(const T* dy, const T* x, T* dw, T* dbias, int64_t M, int64_t N, int64_t K) {
  ops<T>().weight_grad(dy, x, dw, dbias, M, N, K);
}
int64_t scan_backward_scratch_bytes(const ScanArgs& a) { return table().scan_backward_scratch_bytes(a); }
template <typename T>
void ssd_forward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, T* y, T* boundary) {
  ops<T>().ssd_forward(a, t, y, boundary);
}
template <typename T>
void ssd_backward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, const T* boundary, const T* dy,
                  const SsdTrainGrads<T>& g) {
  ops<T>().ssd_backward(a, t, boundary, dy, g);
}
int64_t ssd_backward_scratch_bytes(const SsdTrainArgs& a) { return table().ssd_backward_scratch_bytes(a); }

#define MSSM_TRAIN_OPS(T)                                                                                          \
  template void rmsnorm_forward<T>(const T*, const T*, T*, T*, int64_t, int64_t, T);                              \
  template void rmsnorm_backward<T>(const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t);            \
  template void gated_rmsnorm_forward<T>(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, T, bool); \
  template void gated_rmsnorm_backward<T>(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, int64_t,   \
                                          int64_t, int64_t, bool);                                                  \
  template void conv1d_forward<T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, bool);    \
  template void conv1d_backward<T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t, int64_t, \
                                   int64_t, bool);                                                                  \
  template void scan_forward<T>(const ScanArgs&, const ScanTensors<T>&, T*, T*);                                  \
  template void scan_backward<T>(const ScanArgs&, const ScanTensors<T>&, const T*, const T*, const ScanGrads<T>&); \
  template double cross_entropy<T>(T*, const int32_t*, int64_t, int64_t, T, int64_t*);                            \
  template void transpose<T>(const T*, int64_t, int64_t, T*);                                                   \
  template void weight_grad<T>(const T*, const T*, T*, T*, int64_t, int64_t, int64_t);                        \
  template void ssd_forward<T>(const SsdTrainArgs&, const SsdTrainTensors<T>&, T*, T*);                         \
  template void ssd_backward<T>(const SsdTrainArgs&, const SsdTrainTensors<T>&, const T*, const T*,             \
                                const SsdTrainGrads<T>&);

MSSM_TRAIN_OPS(float)
MSSM_TRAIN_OPS(double)
#undef MSSM_TRAIN_OPS

}  // namespace mssm::train
