// Helpers of the training-op tests (test_train_ops, test_train_ssd): inputs in double, gradients
// against central finite differences, the norm-wise error they are judged by, and a record of the
// worst error of each kind of check for the summary a test prints at the end.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "test_util.h"

namespace mssm::test {

using Vec = std::vector<double>;
using FVec = std::vector<float>;

// Gradients (T = double) are checked against central differences with step kStep, and pass when their
// norm_error is at most kGradTolerance: the difference quotient's own error, O(kStep²) truncation plus
// ~1e-16·|L| / kStep rounding, is about 1e-9 on the tests' problems, while a wrong term (a missing
// factor, a dropped sum) shows at 1e-3 or more.
constexpr double kStep = 1e-6;
constexpr double kGradTolerance = 1e-6;

// The worst error seen per kind of check, printed at the end.
inline std::map<std::string, double>& worst() {
  static std::map<std::string, double> m;
  return m;
}
inline void record(const std::string& key, double err) {
  double& w = worst()[key];
  w = std::max(w, std::isnan(err) ? INFINITY : err);
}

inline Vec normals(Rng& rng, size_t n, double scale = 1.0) {
  Vec v(n);
  for (auto& x : v) x = rng.normal() * scale;
  return v;
}
inline Vec uniforms(Rng& rng, size_t n, double lo, double hi) {
  Vec v(n);
  for (auto& x : v) x = lo + (hi - lo) * rng.uniform();
  return v;
}
template <typename To, typename From>
std::vector<To> cast(const std::vector<From>& v) {
  return std::vector<To>(v.begin(), v.end());
}
inline double dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
inline Vec minus(const Vec& a, const Vec& b) {
  Vec r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}
// A (=) output starts as NaN, so an element the op forgets to write fails the check.
template <typename T>
std::vector<T> poisoned(size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

// ‖got − want‖₂ / max(‖got‖₂, ‖want‖₂); 0 when both are 0; NaN anywhere counts as infinite.
template <typename A, typename B>
double norm_error(const A* got, const B* want, size_t n) {
  double diff = 0, ng = 0, nw = 0;
  for (size_t i = 0; i < n; ++i) {
    const double g = (double)got[i], w = (double)want[i];
    if (std::isnan(g) || std::isnan(w)) return INFINITY;
    diff += (g - w) * (g - w);
    ng += g * g;
    nw += w * w;
  }
  const double scale = std::sqrt(std::max(ng, nw));
  return scale == 0 ? 0 : std::sqrt(diff) / scale;
}

// Central differences of loss() with respect to every element of x (restored afterwards).
inline Vec finite_differences(Vec& x, const std::function<double()>& loss) {
  Vec fd(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + kStep;
    const double up = loss();
    x[i] = keep - kStep;
    const double down = loss();
    x[i] = keep;
    fd[i] = (up - down) / (2 * kStep);
  }
  return fd;
}

}  // namespace mssm::test
