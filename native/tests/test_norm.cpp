// rmsnorm (with the fused residual add), gated_rmsnorm and embedding against naive double references,
// at every CPU level and at 1 and N threads.
#include <cstring>

#include "../core/dtype.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

// Outputs are x · scale · weight (· silu(z)): no sums that cancel, so every element is held to 1e-5
// relative. The floor of 1e-6·RMS(out) only matters for elements that are themselves tiny (x near 0,
// or silu(z) for z far below zero, where the kernel's clamped exp leaves an error below 1e-36).
constexpr double kTolerance = 1e-5;
constexpr double kFloorFraction = 1e-6;

double silu_reference(double z) { return z / (1.0 + std::exp(-z)); }

// out = s / sqrt(mean(s²) + eps) · weight, with s = x + residual rounded to fp32 as the residual
// stream is stored.
std::vector<double> rmsnorm_reference(const std::vector<float>& x, const float* residual, const std::vector<float>& weight,
                                      int64_t rows, int64_t dim, float eps) {
  std::vector<double> out(rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> s(dim);
    double sum = 0;
    for (int64_t i = 0; i < dim; ++i) {
      s[i] = residual ? (double)(x[r * dim + i] + residual[r * dim + i]) : (double)x[r * dim + i];
      sum += s[i] * s[i];
    }
    const double scale = 1.0 / std::sqrt(sum / dim + (double)eps);
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = s[i] * scale * weight[i];
  }
  return out;
}

std::vector<double> gated_reference(const std::vector<float>& x, const float* z, const std::vector<float>& weight,
                                    int64_t rows, int64_t dim, int64_t group_size, float eps, bool norm_before_gate) {
  std::vector<double> out(rows * dim);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g0 = 0; g0 < dim; g0 += group_size) {
      std::vector<double> v(group_size);
      double sum = 0;
      for (int64_t i = 0; i < group_size; ++i) {
        const int64_t at = r * dim + g0 + i;
        v[i] = x[at];
        if (z && !norm_before_gate) v[i] *= silu_reference(z[at]);
        sum += v[i] * v[i];
      }
      const double scale = 1.0 / std::sqrt(sum / group_size + (double)eps);
      for (int64_t i = 0; i < group_size; ++i) {
        const int64_t at = r * dim + g0 + i;
        double o = v[i] * scale * weight[g0 + i];
        if (z && norm_before_gate) o *= silu_reference(z[at]);
        out[at] = o;
      }
    }
  return out;
}

// Where residual_out points: nowhere, its own buffer, the residual (updated in place), or x.
enum class ResidualOut { none, separate, into_residual, into_x };
const char* residual_out_name(ResidualOut r) {
  switch (r) {
    case ResidualOut::none: return "none";
    case ResidualOut::separate: return "separate";
    case ResidualOut::into_residual: return "=residual";
    default: return "=x";
  }
}

void test_rmsnorm() {
  Rng rng(11);
  struct Case { int64_t rows, dim; float eps, scale; };
  // Odd dims and dims past the 512-value summation block; one case where eps is comparable to mean(s²).
  const Case cases[] = {{1, 1, 1e-5f, 1.0f},  {3, 7, 1e-5f, 1.0f},   {2, 16, 1e-6f, 1.0f}, {5, 33, 1e-5f, 2.0f},
                        {3, 771, 1e-5f, 1.0f}, {8, 2049, 1e-5f, 0.5f}, {4, 100, 1e-5f, 3e-3f}, {64, 1536, 1e-5f, 1.0f}};
  for (const Case& c : cases) {
    const int64_t n = c.rows * c.dim;
    std::vector<float> x = rng.normals(n, c.scale), residual = rng.normals(n, c.scale);
    std::vector<float> weight = rng.uniforms(c.dim, 0.5f, 1.5f);
    for (bool with_residual : {false, true}) {
      for (ResidualOut mode : {ResidualOut::none, ResidualOut::separate, ResidualOut::into_residual, ResidualOut::into_x}) {
        if (!with_residual && mode != ResidualOut::none) continue;
        std::vector<double> want = rmsnorm_reference(x, with_residual ? residual.data() : nullptr, weight, c.rows, c.dim, c.eps);
        std::vector<float> want_sum(n);
        for (int64_t i = 0; i < n; ++i) want_sum[i] = x[i] + residual[i];
        const double floor = kFloorFraction * rms(want.data(), n);
        char what[160];
        std::snprintf(what, sizeof what, "rmsnorm rows=%lld dim=%lld residual=%d residual_out=%s", (long long)c.rows,
                      (long long)c.dim, (int)with_residual, residual_out_name(mode));
        for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
          std::vector<float> xs = x, res = residual, separate(n, NAN), out(n, NAN);
          float* residual_out = mode == ResidualOut::separate ? separate.data()
                                : mode == ResidualOut::into_residual ? res.data()
                                : mode == ResidualOut::into_x ? xs.data() : nullptr;
          t.rmsnorm(xs.data(), with_residual ? res.data() : nullptr, weight.data(), out.data(), residual_out, c.rows,
                    c.dim, c.eps);
          expect_close((std::string(what) + " " + label).c_str(), out.data(), want.data(), n, kTolerance, floor);
          if (residual_out)
            MSSM_CHECK(std::memcmp(residual_out, want_sum.data(), n * 4) == 0, "%s %s: residual_out is not x + residual",
                       what, label.c_str());
        });
      }
    }
    // In place: out = x.
    std::vector<double> want = rmsnorm_reference(x, nullptr, weight, c.rows, c.dim, c.eps);
    for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
      std::vector<float> xs = x;
      t.rmsnorm(xs.data(), nullptr, weight.data(), xs.data(), nullptr, c.rows, c.dim, c.eps);
      expect_close(("rmsnorm in place " + label).c_str(), xs.data(), want.data(), n, kTolerance,
                   kFloorFraction * rms(want.data(), n));
    });
  }
}

void test_gated_rmsnorm() {
  Rng rng(21);
  struct Case { int64_t rows, dim, group_size; };
  // One group or several; group sizes that are odd, not multiples of 16, and past the summation block.
  const Case cases[] = {{1, 48, 48}, {3, 111, 37}, {5, 800, 200}, {2, 2048, 256}, {4, 1300, 1300}, {33, 64, 16}};
  for (const Case& c : cases) {
    const int64_t n = c.rows * c.dim;
    std::vector<float> x = rng.normals(n), z = rng.normals(n, 3.0f);
    // Gates far out on both sides, where silu saturates to z or to 0 (and exp must not overflow).
    const float extremes[] = {30.0f, -30.0f, 87.5f, -87.5f, 100.0f, -100.0f, 1000.0f, -1000.0f};
    for (int64_t i = 0; i < n; i += 13) z[i] = extremes[(i / 13) % 8];
    std::vector<float> weight = rng.uniforms(c.dim, 0.5f, 1.5f);
    for (bool gate : {false, true})
      for (bool norm_before_gate : {false, true}) {
        if (!gate && norm_before_gate) continue;  // the same computation without a gate
        const float* zp = gate ? z.data() : nullptr;
        std::vector<double> want = gated_reference(x, zp, weight, c.rows, c.dim, c.group_size, 1e-5f, norm_before_gate);
        const double floor = kFloorFraction * rms(want.data(), n);
        char what[160];
        std::snprintf(what, sizeof what, "gated_rmsnorm rows=%lld dim=%lld group=%lld gate=%d norm_before_gate=%d",
                      (long long)c.rows, (long long)c.dim, (long long)c.group_size, (int)gate, (int)norm_before_gate);
        for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
          std::vector<float> out(n, NAN);
          t.gated_rmsnorm(x.data(), zp, weight.data(), out.data(), c.rows, c.dim, c.group_size, 1e-5f, norm_before_gate);
          expect_close((std::string(what) + " " + label).c_str(), out.data(), want.data(), n, kTolerance, floor);
          // Output over an input: out = x, and out = z.
          std::vector<float> xs = x, zs = z;
          t.gated_rmsnorm(xs.data(), gate ? zs.data() : nullptr, weight.data(), xs.data(), c.rows, c.dim, c.group_size,
                          1e-5f, norm_before_gate);
          expect_close((std::string(what) + " out=x " + label).c_str(), xs.data(), want.data(), n, kTolerance, floor);
          if (gate) {
            xs = x;
            t.gated_rmsnorm(xs.data(), zs.data(), weight.data(), zs.data(), c.rows, c.dim, c.group_size, 1e-5f,
                            norm_before_gate);
            expect_close((std::string(what) + " out=z " + label).c_str(), zs.data(), want.data(), n, kTolerance, floor);
          }
        });
      }
  }
}

// The checks above can fail: a 2e-5 relative error in one element of a real output is caught.
void test_check_catches_errors() {
  Rng rng(5);
  const int64_t rows = 3, dim = 33;
  std::vector<float> x = rng.normals(rows * dim), weight = rng.uniforms(dim, 0.5f, 1.5f);
  std::vector<double> want = rmsnorm_reference(x, nullptr, weight, rows, dim, 1e-5f);
  std::vector<float> out(rows * dim);
  cpu::kernels().rmsnorm(x.data(), nullptr, weight.data(), out.data(), nullptr, rows, dim, 1e-5f);
  const double floor = kFloorFraction * rms(want.data(), rows * dim);
  MSSM_CHECK(compare(out.data(), want.data(), rows * dim, floor).max_rel <= kTolerance, "unperturbed output passes");
  out[17] = (float)(want[17] * (1 + 2e-5));
  MSSM_CHECK(compare(out.data(), want.data(), rows * dim, floor).max_rel > kTolerance, "a 2e-5 error is caught");
}

void test_embedding() {
  Rng rng(31);
  const int64_t vocab = 50;
  for (DType dtype : {DType::f32, DType::f16, DType::bf16, DType::q8_0}) {
    const int64_t dim = dtype == DType::q8_0 ? 800 : 771;
    std::vector<float> values = rng.normals(vocab * dim);
    std::vector<uint8_t> table(dtype_bytes(dtype, vocab * dim));
    std::vector<float> stored(vocab * dim);  // what each entry reads back as, by dtype.h's scalar functions
    if (dtype == DType::f32) {
      std::memcpy(table.data(), values.data(), table.size());
      stored = values;
    } else if (dtype == DType::q8_0) {
      BlockQ8_0* blocks = (BlockQ8_0*)table.data();
      for (int64_t b = 0; b < vocab * dim / kQ8BlockSize; ++b) {
        blocks[b].d = f32_to_f16(0.02f + 0.001f * (float)(b % 7));
        for (int i = 0; i < kQ8BlockSize; ++i) {
          blocks[b].qs[i] = (int8_t)((int)(rng.next() % 255) - 127);
          stored[b * kQ8BlockSize + i] = (float)blocks[b].qs[i] * f16_to_f32(blocks[b].d);
        }
      }
    } else {
      uint16_t* h = (uint16_t*)table.data();
      for (int64_t i = 0; i < vocab * dim; ++i) {
        h[i] = dtype == DType::f16 ? f32_to_f16(values[i]) : f32_to_bf16(values[i]);
        stored[i] = dtype == DType::f16 ? f16_to_f32(h[i]) : bf16_to_f32(h[i]);
      }
    }
    // One id, a few, and enough to split over threads; first, last and repeated ids.
    for (int64_t count : {int64_t(1), int64_t(7), int64_t(300)}) {
      std::vector<int32_t> ids(count);
      for (int64_t i = 0; i < count; ++i) ids[i] = (int32_t)(rng.next() % vocab);
      ids[0] = (int32_t)(vocab - 1);
      if (count > 2) { ids[1] = 0; ids[2] = 0; }
      for_each_level([&](const cpu::KernelTable& t, const std::string& label) {
        std::vector<float> out(count * dim, NAN);
        t.embedding(table.data(), dtype, ids.data(), out.data(), count, dim);
        int64_t bad = 0;
        for (int64_t i = 0; i < count; ++i)
          bad += std::memcmp(out.data() + i * dim, stored.data() + (int64_t)ids[i] * dim, dim * 4) != 0;
        MSSM_CHECK(bad == 0, "embedding %s count=%lld %s: %lld rows differ from the table", dtype_name(dtype),
                   (long long)count, label.c_str(), (long long)bad);
      });
    }
  }
}

}  // namespace

int main() {
  test_rmsnorm();
  test_gated_rmsnorm();
  test_check_catches_errors();
  test_embedding();
  return finish("test_norm");
}
