// The problem shapes of the SSD training backward's tests on the device (test_cuda_scan_train) and of
// its block code on the host (test_ssd_backward_blocks): length 1; chunks that do and do not divide
// the length; chunk ≥ length; chunk, head_dim and state not multiples of 16; a state over several
// 64-column tiles; groups 1, 2 and 3; the dt clamp; no softplus; D and dt_bias each present or absent.
#pragma once
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace mssm::test {

struct SsdTrainShape {
  int64_t batch, length, heads, head_dim, state, groups, chunk;
  bool softplus;
  double dt_min, dt_max;
  bool has_D, has_bias;
};

inline std::string describe(const SsdTrainShape& s) {
  return "B" + std::to_string(s.batch) + " L" + std::to_string(s.length) + " H" + std::to_string(s.heads) + " P" +
         std::to_string(s.head_dim) + " N" + std::to_string(s.state) + " G" + std::to_string(s.groups) + " chunk" +
         std::to_string(s.chunk) + (s.softplus ? "" : " no-softplus") + (s.dt_min > 0 ? " clamped" : "") +
         (s.has_D ? " D" : "") + (s.has_bias ? " bias" : "");
}

inline const std::vector<SsdTrainShape>& ssd_train_shapes() {
  static const std::vector<SsdTrainShape> shapes = {
      {1, 1, 2, 3, 4, 1, 64, true, 0.0, INFINITY, true, true},
      {2, 37, 6, 16, 12, 2, 8, true, 0.0, INFINITY, true, true},
      {1, 70, 4, 8, 64, 1, 16, true, 0.0, INFINITY, false, true},
      {2, 40, 3, 5, 40, 3, 64, true, 0.05, 0.5, true, false},
      {1, 33, 4, 4, 130, 2, 10, false, 0.0, INFINITY, true, true},
      {2, 50, 4, 16, 128, 2, 32, true, 0.0, INFINITY, true, true},
      {1, 150, 2, 64, 48, 1, 64, true, 0.0, INFINITY, true, true},
      {1, 200, 4, 64, 128, 1, 64, true, 0.0, INFINITY, true, true},
      {1, 45, 3, 20, 33, 3, 50, true, 0.0, INFINITY, false, false},
  };
  return shapes;
}

}  // namespace mssm::test
