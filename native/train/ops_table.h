// The training ops of one CPU level as a table: ops.cpp is compiled once per level (like the kernels of
// native/cpu) and fills mssm::train::<level>::ops_table; ops_dispatch.cpp defines the public functions
// of ops.h by calling the table of the level in use (cpu::current_cpu_level()). The chunked SSD of
// ssd_chunked.h lives in its own file (ssd_chunked.cpp, compiled per level alongside ops.cpp) and has
// its entries here too.
#pragma once
#include "ops.h"
#include "ssd_chunked.h"

namespace mssm::train {

template <typename T>
struct OpsFor {
  void (*rmsnorm_forward)(const T*, const T*, T*, T*, int64_t, int64_t, T);
  void (*rmsnorm_backward)(const T*, const T*, const T*, const T*, T*, T*, int64_t, int64_t);
  void (*gated_rmsnorm_forward)(const T*, const T*, const T*, T*, T*, int64_t, int64_t, int64_t, T, bool);
  void (*gated_rmsnorm_backward)(const T*, const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t,
                                 int64_t, bool);
  void (*conv1d_forward)(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, bool);
  void (*conv1d_backward)(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t, int64_t, int64_t, int64_t,
                          bool);
  void (*scan_forward)(const ScanArgs&, const ScanTensors<T>&, T*, T*);
  void (*scan_backward)(const ScanArgs&, const ScanTensors<T>&, const T*, const T*, const ScanGrads<T>&);
  double (*cross_entropy)(T*, const int32_t*, int64_t, int64_t, T, int64_t*);
  void (*transpose)(const T*, int64_t, int64_t, T*);
  void (*weight_grad)(const T*, const T*, T*, T*, int64_t, int64_t, int64_t);
  void (*ssd_forward)(const SsdTrainArgs&, const SsdTrainTensors<T>&, T*, T*);
  void (*ssd_backward)(const SsdTrainArgs&, const SsdTrainTensors<T>&, const T*, const T*, const SsdTrainGrads<T>&);
};

struct TrainOpsTable {
  OpsFor<float> f32;
  OpsFor<double> f64;
  int64_t (*scan_backward_scratch_bytes)(const ScanArgs&);
  int64_t (*ssd_backward_scratch_bytes)(const SsdTrainArgs&);
};

}  // namespace mssm::train

#if defined(MSSM_LEVEL)
// ssd_chunked.cpp's functions of the level being compiled, for the table that ops.cpp fills.
namespace mssm::train::MSSM_LEVEL {
template <typename T>
void ssd_forward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, T* y, T* boundary);
template <typename T>
void ssd_backward(const SsdTrainArgs& a, const SsdTrainTensors<T>& t, const T* boundary, const T* dy,
                  const SsdTrainGrads<T>& g);
int64_t ssd_backward_scratch_bytes(const SsdTrainArgs& a);
}  // namespace mssm::train::MSSM_LEVEL
#endif
