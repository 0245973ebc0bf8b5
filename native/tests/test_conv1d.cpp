// conv1d and conv1d_step against a naive float64 reference that builds xp = concat(state_in, x)
// explicitly, on every CPU level at 1 and N threads; the one-token form and a split sequence must
// agree with one call of the sequence form.
//
// Tolerance: fp32 results within 1e-5 relative of the reference, measured against |want| + floor
// with floor = 0.1·RMS(output): elements that cancel to near zero may be off by 1e-6·RMS absolute
// (the fp32 rounding of K products of size ~RMS is ~K·6e-8·RMS). States are copies of inputs: exact.
#include <algorithm>
#include <cstring>

#include "test_util.h"

using namespace mssm;
using namespace mssm::test;

namespace {

constexpr double kRel = 1e-5;
constexpr double kFloor = 0.1;  // × RMS of the compared output

enum class StateOut { none, separate, aliased };

struct Case {
  int64_t batch, length, channels, kernel;
  bool bias, silu, state_in;
  StateOut state_out;
  std::vector<float> x, w, b, s_in;
  std::vector<double> y_ref, s_ref;  // reference output and final state [batch, K-1, channels]
};

// y[b,t,c] = act(bias[c] + Σ_k w[c,k] · xp[b,t+k,c]);  state_out = last K-1 rows of xp.
void reference(Case& c) {
  const int64_t H = c.kernel - 1, L = c.length, C = c.channels;
  c.y_ref.assign(c.batch * L * C, 0.0);
  c.s_ref.assign(c.batch * H * C, 0.0);
  for (int64_t b = 0; b < c.batch; ++b) {
    std::vector<double> xp((H + L) * C, 0.0);
    for (int64_t r = 0; r < H; ++r)
      for (int64_t ch = 0; ch < C; ++ch) xp[r * C + ch] = c.state_in ? c.s_in[(b * H + r) * C + ch] : 0.0;
    for (int64_t t = 0; t < L; ++t)
      for (int64_t ch = 0; ch < C; ++ch) xp[(H + t) * C + ch] = c.x[(b * L + t) * C + ch];
    for (int64_t t = 0; t < L; ++t)
      for (int64_t ch = 0; ch < C; ++ch) {
        double acc = c.bias ? c.b[ch] : 0.0;
        for (int64_t k = 0; k < c.kernel; ++k) acc += (double)c.w[ch * c.kernel + k] * xp[(t + k) * C + ch];
        if (c.silu) acc = acc / (1.0 + std::exp(-acc));
        c.y_ref[(b * L + t) * C + ch] = acc;
      }
    for (int64_t r = 0; r < H; ++r)
      for (int64_t ch = 0; ch < C; ++ch) c.s_ref[(b * H + r) * C + ch] = xp[(L + r) * C + ch];
  }
}

std::vector<Case> make_cases() {
  std::vector<Case> cases;
  Rng rng(20240611);
  int index = 0;
  for (int64_t batch : {1, 3})
    for (int64_t length : {1, 2, 7, 33, 100})
      for (int64_t channels : {5, 24, 37, 70})  // 70: a full 64-channel block plus a tail
        for (int64_t kernel : {1, 2, 4}) {
          // Options cycle so that each is on and off across many sizes.
          Case c{batch, length, channels, kernel, index % 2 == 0, index / 2 % 2 == 0, index / 4 % 2 == 0,
                 (StateOut)(index / 8 % 3)};
          ++index;
          const int64_t H = kernel - 1;
          c.x = rng.normals(batch * length * channels);
          c.w = rng.normals(channels * kernel, 0.5f);
          c.b = rng.normals(channels, 0.5f);
          c.s_in = rng.normals(batch * H * channels);
          reference(c);
          cases.push_back(std::move(c));
        }
  // Wide steps, whose channel blocks a step splits over the threads (1100: 17 full blocks and a tail),
  // and a kernel of more than 8 taps.
  for (int64_t batch : {1, 2})
    for (int64_t length : {1, 7})
      for (int64_t kernel : {4, 9}) {
        const int64_t channels = kernel == 9 ? 70 : 1100;
        Case c{batch, length, channels, kernel, index % 2 == 0, true, true, (StateOut)(index % 3)};
        ++index;
        c.x = rng.normals(batch * length * channels);
        c.w = rng.normals(channels * kernel, 0.5f);
        c.b = rng.normals(channels, 0.5f);
        c.s_in = rng.normals(batch * (kernel - 1) * channels);
        reference(c);
        cases.push_back(std::move(c));
      }
  return cases;
}

void test_sequence_form(const std::vector<Case>& cases) {
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Case& c : cases) {
      const int64_t H = c.kernel - 1;
      std::vector<float> y(c.batch * c.length * c.channels, NAN);
      std::vector<float> state = c.s_in;              // aliased: in and out are this buffer
      std::vector<float> out(state.size(), NAN);      // separate out
      const float* s_in = c.state_in ? state.data() : nullptr;
      float* s_out = c.state_out == StateOut::none ? nullptr
                     : c.state_out == StateOut::separate ? out.data()
                                                         : state.data();
      if (c.state_out == StateOut::aliased && !c.state_in) std::fill(state.begin(), state.end(), NAN);
      k.conv1d(c.x.data(), c.w.data(), c.bias ? c.b.data() : nullptr, s_in, s_out, y.data(), c.batch, c.length,
               c.channels, c.kernel, c.silu);
      char what[160];
      std::snprintf(what, sizeof what, "%s conv1d b%lld L%lld C%lld K%lld bias%d silu%d in%d out%d y", label.c_str(),
                    (long long)c.batch, (long long)c.length, (long long)c.channels, (long long)c.kernel, c.bias,
                    c.silu, c.state_in, (int)c.state_out);
      expect_close(what, y.data(), c.y_ref.data(), (int64_t)y.size(), kRel, kFloor * rms(c.y_ref.data(), y.size()));
      if (s_out) {
        std::strcat(what, " state");
        expect_close(what, s_out, c.s_ref.data(), c.batch * H * c.channels, 0.0, 1e-30);
      }
    }
  });
}

// Token by token through conv1d_step, and the sequence cut in two calls, both equal one call.
void test_step_and_split(const std::vector<Case>& cases) {
  for_each_level([&](const cpu::KernelTable& k, const std::string& label) {
    for (const Case& c : cases) {
      if (!c.state_in || c.kernel == 1) continue;
      const int64_t H = c.kernel - 1, L = c.length, C = c.channels;
      const float* bias = c.bias ? c.b.data() : nullptr;
      std::vector<float> y_seq(c.batch * L * C), s_seq(c.batch * H * C);
      k.conv1d(c.x.data(), c.w.data(), bias, c.s_in.data(), s_seq.data(), y_seq.data(), c.batch, L, C, c.kernel,
               c.silu);

      std::vector<float> state = c.s_in, x_t(c.batch * C), y_t(c.batch * C), y_step(c.batch * L * C);
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t b = 0; b < c.batch; ++b) std::memcpy(&x_t[b * C], &c.x[(b * L + t) * C], C * sizeof(float));
        k.conv1d_step(x_t.data(), c.w.data(), bias, state.data(), y_t.data(), c.batch, C, c.kernel, c.silu);
        for (int64_t b = 0; b < c.batch; ++b) std::memcpy(&y_step[(b * L + t) * C], &y_t[b * C], C * sizeof(float));
      }
      const double floor = kFloor * rms(y_seq.data(), y_seq.size());
      char what[160];
      std::snprintf(what, sizeof what, "%s step b%lld L%lld C%lld K%lld", label.c_str(), (long long)c.batch,
                    (long long)L, (long long)C, (long long)c.kernel);
      expect_close(what, y_step.data(), y_seq.data(), (int64_t)y_seq.size(), kRel, floor);
      expect_close(what, state.data(), s_seq.data(), (int64_t)state.size(), 0.0, 1e-30);

      if (L < 2) continue;
      const int64_t first = L / 3 + 1, second = L - first;
      std::vector<float> x1(c.batch * first * C), x2(c.batch * second * C), y1(x1.size()), y2(x2.size());
      for (int64_t b = 0; b < c.batch; ++b) {
        std::memcpy(&x1[b * first * C], &c.x[b * L * C], first * C * sizeof(float));
        std::memcpy(&x2[b * second * C], &c.x[(b * L + first) * C], second * C * sizeof(float));
      }
      std::vector<float> carried = c.s_in;
      k.conv1d(x1.data(), c.w.data(), bias, carried.data(), carried.data(), y1.data(), c.batch, first, C, c.kernel,
               c.silu);
      k.conv1d(x2.data(), c.w.data(), bias, carried.data(), carried.data(), y2.data(), c.batch, second, C, c.kernel,
               c.silu);
      std::vector<float> y_split(y_seq.size());
      for (int64_t b = 0; b < c.batch; ++b) {
        std::memcpy(&y_split[b * L * C], &y1[b * first * C], first * C * sizeof(float));
        std::memcpy(&y_split[(b * L + first) * C], &y2[b * second * C], second * C * sizeof(float));
      }
      std::strcat(what, " split");
      expect_close(what, y_split.data(), y_seq.data(), (int64_t)y_seq.size(), kRel, floor);
      expect_close(what, carried.data(), s_seq.data(), (int64_t)carried.size(), 0.0, 1e-30);
    }
  });
}

// The comparison can fail: a 1e-4 relative error in one element, or the taps applied in reverse
// order (an anti-causal filter), must exceed the tolerance.
void test_comparison_catches_errors(const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    if (c.length != 33 || c.channels != 37 || c.kernel != 4 || c.batch != 1) continue;
    std::vector<float> y(c.y_ref.begin(), c.y_ref.end());
    const double floor = kFloor * rms(c.y_ref.data(), y.size());
    const auto largest = std::max_element(y.begin(), y.end(), [](float a, float b) { return std::fabs(a) < std::fabs(b); });
    *largest *= 1.0f + 1e-4f;
    MSSM_CHECK(compare(y.data(), c.y_ref.data(), (int64_t)y.size(), floor).max_rel > kRel, "perturbation missed");
    Case flipped = c;
    for (int64_t ch = 0; ch < c.channels; ++ch)
      std::reverse(flipped.w.begin() + ch * c.kernel, flipped.w.begin() + (ch + 1) * c.kernel);
    reference(flipped);
    MSSM_CHECK(compare(flipped.y_ref.data(), c.y_ref.data(), (int64_t)y.size(), floor).max_rel > kRel,
               "reversed taps missed");
  }
}

}  // namespace

int main() {
  std::vector<Case> cases = make_cases();
  test_comparison_catches_errors(cases);
  test_sequence_form(cases);
  test_step_and_split(cases);
  return finish("test_conv1d");
}
