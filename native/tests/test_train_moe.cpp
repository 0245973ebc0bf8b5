// The training MoE block (train/moe.h): forward, load-balancing loss and backward.
//
// - Double forward against a naive per-token reference (full sort for top-k): out and aux to 1e-12.
// - Double backward against central finite differences (h = 1e-5) of L = Σ out ⊙ R + aux_weight·aux
//   for x and every parameter, on tiny awkward shapes over every scoring, renormalisation, activation
//   and bias choice. Inputs are resampled until every token's k-th and (k+1)-th scores differ by more
//   than 1e-4, and each perturbed forward must choose the same experts, so no top-k switch happens
//   within ±h. Norm-wise relative error per tensor ≤ 1e-6.
// - Float forward against the inference kernels (matmul for the router, moe_route, moe_experts) at
//   every CPU level: the same experts; weights within 1e-5 relative; out within 1e-5 norm-wise and
//   elementwise relative to |want| + RMS(out). Not the 0.1·RMS floor of test_moe: there the weights
//   are given, here each side rounds its own router logits (~1e-6 at logits of O(1)), which moves the
//   combine weights; the inference kernels themselves then differ from the double reference by up to
//   ~2e-5 at that floor. The float forward is held to the same against the double reference: 2e-5
//   relative to |want| + 0.1·RMS.
// - Bit-identical results at 1 and 2 threads, float and double.
// - The checker can fail: one perturbed gradient element, and a backward that leaves out the aux
//   loss's gradient, are both detected.
#include <algorithm>
#include <cstring>

#include "../train/moe.h"
#include "test_util.h"

using namespace mssm;
using namespace mssm::test;
using cpu::Activation;
using cpu::MoeScoring;
using train::MoeParamGrads;
using train::MoeParams;
using train::MoeSaved;
using train::MoeShape;

namespace {

const char* scoring_name(MoeScoring s) { return s == MoeScoring::softmax ? "softmax" : "sigmoid"; }
const char* activation_name(Activation a) {
  return a == Activation::silu ? "silu" : a == Activation::gelu ? "gelu" : "gelu_tanh";
}

template <typename T>
struct Problem {
  MoeShape shape;
  bool biases = false;
  std::vector<T> x, router, router_bias, fc1, fc1_bias, fc2, fc2_bias;

  MoeParams<T> params() const {
    return {router.data(), biases ? router_bias.data() : nullptr, fc1.data(), biases ? fc1_bias.data() : nullptr,
            fc2.data(), biases ? fc2_bias.data() : nullptr};
  }
};

template <typename T>
std::vector<T> normals(Rng& rng, int64_t n, float scale) {
  std::vector<float> v = rng.normals((size_t)n, scale);
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
Problem<T> make_problem(Rng& rng, const MoeShape& shape, bool biases) {
  const int64_t Tn = shape.tokens, D = shape.dim, H = shape.hidden, E = shape.experts;
  Problem<T> p;
  p.shape = shape;
  p.biases = biases;
  p.x = normals<T>(rng, Tn * D, 1.0f);
  // Scaled by fan-in so logits and hidden values are O(1) at every width, as a trained model's are (at
  // widths ~100 with unscaled weights, the float logits' rounding alone moves the combine weights by 1e-5).
  p.router = normals<T>(rng, E * D, 1.5f / std::sqrt((float)D));
  p.router_bias = normals<T>(rng, E, 0.3f);
  p.fc1 = normals<T>(rng, E * 2 * H * D, 1.0f / std::sqrt((float)D));
  p.fc1_bias = normals<T>(rng, E * 2 * H, 0.3f);
  p.fc2 = normals<T>(rng, E * D * H, 1.0f / std::sqrt((float)H));
  p.fc2_bias = normals<T>(rng, E * D, 0.3f);
  return p;
}

// ---- naive double reference of the forward ----

// Scores of token t in double.
std::vector<double> reference_scores(const Problem<double>& p, int64_t t) {
  const MoeShape& s = p.shape;
  std::vector<double> logit(s.experts);
  for (int64_t e = 0; e < s.experts; ++e) {
    double v = p.biases ? p.router_bias[e] : 0.0;
    for (int64_t d = 0; d < s.dim; ++d) v += p.x[t * s.dim + d] * p.router[e * s.dim + d];
    logit[e] = v;
  }
  return mssm::test::reference_scores(logit, s.scoring);
}

std::vector<double> reference_forward(const Problem<double>& p, double* aux) {
  const MoeShape& s = p.shape;
  const int64_t D = s.dim, H = s.hidden, E = s.experts, k = std::min(s.top_k, E);
  std::vector<double> out((size_t)(s.tokens * D), 0.0), P(E, 0.0), f(E, 0.0);
  for (int64_t t = 0; t < s.tokens; ++t) {
    const std::vector<double> score = reference_scores(p, t);
    const std::vector<int32_t> order = descending(score);
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += score[order[j]];
    for (int64_t e = 0; e < E; ++e) P[e] += score[e] / s.tokens;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = order[j];
      f[e] += 1.0 / (s.tokens * k);
      const double w = s.renormalize ? score[e] / sum : score[e];
      std::vector<double> g(H);
      for (int64_t i = 0; i < H; ++i) {
        double a = p.biases ? p.fc1_bias[e * 2 * H + i] : 0.0, b = p.biases ? p.fc1_bias[e * 2 * H + H + i] : 0.0;
        for (int64_t d = 0; d < D; ++d) {
          a += p.fc1[(e * 2 * H + i) * D + d] * p.x[t * D + d];
          b += p.fc1[(e * 2 * H + H + i) * D + d] * p.x[t * D + d];
        }
        g[i] = reference_activation(a, s.activation) * b;
      }
      for (int64_t d = 0; d < D; ++d) {
        double o = p.biases ? p.fc2_bias[e * D + d] : 0.0;
        for (int64_t i = 0; i < H; ++i) o += p.fc2[(e * D + d) * H + i] * g[i];
        out[t * D + d] += w * o;
      }
    }
  }
  *aux = 0;
  for (int64_t e = 0; e < E; ++e) *aux += E * f[e] * P[e];
  return out;
}

// Smallest gap between the k-th and (k+1)-th score over tokens (infinite when k ≥ E).
double routing_gap(const Problem<double>& p) {
  double gap = INFINITY;
  const int64_t k = p.shape.top_k;
  if (k >= p.shape.experts) return gap;
  for (int64_t t = 0; t < p.shape.tokens; ++t) {
    const std::vector<double> score = reference_scores(p, t);
    const std::vector<int32_t> order = descending(score);
    gap = std::min(gap, score[order[k - 1]] - score[order[k]]);
  }
  return gap;
}

// ---- gradients ----

struct Gradients {
  std::vector<double> x, router, router_bias, fc1, fc1_bias, fc2, fc2_bias;
};

Gradients analytic(const Problem<double>& p, const std::vector<double>& R, double aux_weight) {
  const MoeShape& s = p.shape;
  std::vector<double> out((size_t)(s.tokens * s.dim));
  MoeSaved<double> saved;
  double aux;
  train::moe_forward(s, p.params(), p.x.data(), out.data(), &saved, &aux);
  Gradients g;
  g.x.assign(p.x.size(), 0.0);
  g.router.assign(p.router.size(), 0.0);
  g.router_bias.assign(p.router_bias.size(), 0.0);
  g.fc1.assign(p.fc1.size(), 0.0);
  g.fc1_bias.assign(p.fc1_bias.size(), 0.0);
  g.fc2.assign(p.fc2.size(), 0.0);
  g.fc2_bias.assign(p.fc2_bias.size(), 0.0);
  MoeParamGrads<double> grads{g.router.data(), p.biases ? g.router_bias.data() : nullptr, g.fc1.data(),
                              p.biases ? g.fc1_bias.data() : nullptr, g.fc2.data(), p.biases ? g.fc2_bias.data() : nullptr};
  train::moe_backward(s, p.params(), p.x.data(), saved, R.data(), aux_weight, g.x.data(), grads);
  return g;
}

// L = Σ out ⊙ R + aux_weight·aux; indices receives the chosen experts.
double loss(const Problem<double>& p, const std::vector<double>& R, double aux_weight, std::vector<int32_t>* indices) {
  std::vector<double> out((size_t)(p.shape.tokens * p.shape.dim));
  MoeSaved<double> saved;
  double aux;
  train::moe_forward(p.shape, p.params(), p.x.data(), out.data(), &saved, &aux);
  if (indices) *indices = saved.indices;
  double L = aux_weight * aux;
  for (size_t i = 0; i < out.size(); ++i) L += out[i] * R[i];
  return L;
}

struct TensorRef {
  const char* name;
  std::vector<double>* value;
  const std::vector<double>* grad;
};

std::vector<TensorRef> tensors(Problem<double>& p, const Gradients& g) {
  std::vector<TensorRef> list = {{"x", &p.x, &g.x}, {"router", &p.router, &g.router}, {"fc1", &p.fc1, &g.fc1},
                                 {"fc2", &p.fc2, &g.fc2}};
  if (p.biases) {
    list.push_back({"router_bias", &p.router_bias, &g.router_bias});
    list.push_back({"fc1_bias", &p.fc1_bias, &g.fc1_bias});
    list.push_back({"fc2_bias", &p.fc2_bias, &g.fc2_bias});
  }
  return list;
}

// Central differences of every element of one tensor. switched: set when a perturbation changed the
// chosen experts (the caller resamples the inputs so this never happens).
std::vector<double> finite_differences(Problem<double>& p, std::vector<double>& value, const std::vector<double>& R,
                                       double aux_weight, const std::vector<int32_t>& base_indices, bool* switched) {
  const double h = 1e-5;
  std::vector<double> fd(value.size());
  std::vector<int32_t> plus, minus;
  for (size_t i = 0; i < value.size(); ++i) {
    const double v = value[i];
    value[i] = v + h;
    const double Lp = loss(p, R, aux_weight, &plus);
    value[i] = v - h;
    const double Lm = loss(p, R, aux_weight, &minus);
    value[i] = v;
    if (plus != base_indices || minus != base_indices) *switched = true;
    fd[i] = (Lp - Lm) / (2 * h);
  }
  return fd;
}

// ‖got − want‖ / ‖want‖.
double normwise_error(const std::vector<double>& got, const std::vector<double>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    err += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(err) / (std::sqrt(norm) + 1e-300);
}

const double kGradTolerance = 1e-6;
const double kAuxWeight = 0.37;

void test_gradients() {
  Rng rng(2024);
  double worst_forward = 0;
  std::vector<std::pair<std::string, double>> worst;  // per tensor, in first-seen order
  int cases = 0;
  struct Dims { int64_t experts, top_k; };
  for (int64_t tokens : {1, 5, 9})
    for (Dims dims : {Dims{3, 1}, Dims{3, 2}, Dims{4, 1}, Dims{4, 2}, Dims{3, 4}})
      for (MoeScoring scoring : {MoeScoring::softmax, MoeScoring::sigmoid})
        for (bool renormalize : {false, true})
          for (Activation activation : {Activation::silu, Activation::gelu, Activation::gelu_tanh})
            for (bool biases : {false, true}) {
              if (dims.top_k > dims.experts && (tokens != 5 || activation != Activation::silu)) continue;
              MoeShape s;
              s.tokens = tokens; s.dim = 7; s.hidden = 5; s.experts = dims.experts; s.top_k = dims.top_k;
              s.scoring = scoring; s.renormalize = renormalize; s.activation = activation;
              char what[160];
              std::snprintf(what, sizeof what, "T%lld E%lld k%lld %s%s %s%s", (long long)tokens,
                            (long long)dims.experts, (long long)dims.top_k, scoring_name(scoring),
                            renormalize ? " renorm" : "", activation_name(activation), biases ? " bias" : "");
              Problem<double> p;
              int tries = 0;
              do p = make_problem<double>(rng, s, biases);
              while (routing_gap(p) <= 1e-4 && ++tries < 100);
              MSSM_CHECK(routing_gap(p) > 1e-4, "%s: no input without a near-tie in 100 tries", what);

              // Forward against the naive reference.
              double aux_ref, aux;
              const std::vector<double> want = reference_forward(p, &aux_ref);
              std::vector<double> out(want.size());
              train::moe_forward<double>(s, p.params(), p.x.data(), out.data(), nullptr, &aux);
              const double ferr = std::max(normwise_error(out, want), std::fabs(aux - aux_ref) / std::fabs(aux_ref));
              worst_forward = std::max(worst_forward, ferr);
              MSSM_CHECK(ferr <= 1e-12, "%s: forward vs reference: %.3g", what, ferr);

              const std::vector<double> R = normals<double>(rng, tokens * s.dim, 1.0f);
              const Gradients g = analytic(p, R, kAuxWeight);
              std::vector<int32_t> base;
              loss(p, R, kAuxWeight, &base);
              for (const TensorRef& t : tensors(p, g)) {
                bool switched = false;
                const std::vector<double> fd = finite_differences(p, *t.value, R, kAuxWeight, base, &switched);
                MSSM_CHECK(!switched, "%s %s: a perturbation switched the top-k", what, t.name);
                const double err = normwise_error(*t.grad, fd);
                auto it = std::find_if(worst.begin(), worst.end(), [&](const auto& w) { return w.first == t.name; });
                if (it == worst.end()) worst.emplace_back(t.name, err);
                else it->second = std::max(it->second, err);
                MSSM_CHECK(err <= kGradTolerance, "%s: d%s norm-wise error %.3g", what, t.name, err);
              }
              ++cases;
            }
  std::printf("  gradients: %d cases vs central differences; worst norm-wise error per tensor:", cases);
  for (const auto& w : worst) std::printf(" d%s %.2g", w.first.c_str(), w.second);
  std::printf("\n  double forward vs naive reference (out and aux): %.3g\n", worst_forward);
}

// The checker can fail: a gradient off by 1e-5 of its norm in one element, and a backward that drops
// the load-balancing gradient, are both caught.
void test_checker_can_fail() {
  Rng rng(77);
  MoeShape s;
  s.tokens = 5; s.dim = 7; s.hidden = 5; s.experts = 4; s.top_k = 2;
  Problem<double> p;
  do p = make_problem<double>(rng, s, true);
  while (routing_gap(p) <= 1e-4);
  const std::vector<double> R = normals<double>(rng, s.tokens * s.dim, 1.0f);
  std::vector<int32_t> base;
  loss(p, R, kAuxWeight, &base);
  bool switched = false;

  Gradients g = analytic(p, R, kAuxWeight);
  const std::vector<double> fd1 = finite_differences(p, p.fc1, R, kAuxWeight, base, &switched);
  const double clean = normwise_error(g.fc1, fd1);
  double norm = 0;
  for (double v : fd1) norm += v * v;
  g.fc1[17] += 1e-5 * std::sqrt(norm);
  const double perturbed = normwise_error(g.fc1, fd1);
  MSSM_CHECK(clean <= kGradTolerance && perturbed > kGradTolerance,
             "one fc1 element off by 1e-5·norm: error %.3g (clean %.3g) should exceed %.3g", perturbed, clean,
             kGradTolerance);

  const Gradients no_aux = analytic(p, R, 0.0);  // backward without the aux term; the loss keeps it
  const std::vector<double> fdr = finite_differences(p, p.router, R, kAuxWeight, base, &switched);
  const double dropped = normwise_error(no_aux.router, fdr);
  MSSM_CHECK(dropped > kGradTolerance, "dropping the aux gradient: router error %.3g should exceed %.3g", dropped,
             kGradTolerance);
  MSSM_CHECK(!switched, "checker case: a perturbation switched the top-k");
  std::printf("  checker: one element off by 1e-5·norm -> %.3g; aux gradient dropped -> %.3g (limit %.3g)\n",
              perturbed, dropped, kGradTolerance);
}

// Float forward against the inference kernels.
void test_float_matches_inference() {
  Rng rng(5);
  struct Dims { int64_t tokens, dim, hidden, experts, top_k; };
  double worst_out = 0, worst_norm = 0, worst_weight = 0, worst_double = 0;
  int cases = 0;
  for (Dims d : {Dims{1, 64, 48, 8, 1}, Dims{37, 33, 20, 5, 2}, Dims{100, 96, 64, 8, 2}, Dims{9, 7, 5, 3, 3}})
    for (MoeScoring scoring : {MoeScoring::softmax, MoeScoring::sigmoid})
      for (bool renormalize : {false, true})
        for (Activation activation : {Activation::silu, Activation::gelu, Activation::gelu_tanh})
          for (bool biases : {false, true}) {
            MoeShape s;
            s.tokens = d.tokens; s.dim = d.dim; s.hidden = d.hidden; s.experts = d.experts; s.top_k = d.top_k;
            s.scoring = scoring; s.renormalize = renormalize; s.activation = activation;
            const Problem<float> p = make_problem<float>(rng, s, biases);
            const MoeParams<float> params = p.params();
            std::vector<float> out((size_t)(s.tokens * s.dim));
            MoeSaved<float> saved;
            train::moe_forward(s, params, p.x.data(), out.data(), &saved, nullptr);
            ++cases;
            {
              Problem<double> pd;
              pd.shape = s;
              pd.biases = biases;
              auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
              pd.x = widen(p.x); pd.router = widen(p.router); pd.router_bias = widen(p.router_bias);
              pd.fc1 = widen(p.fc1); pd.fc1_bias = widen(p.fc1_bias); pd.fc2 = widen(p.fc2); pd.fc2_bias = widen(p.fc2_bias);
              double aux;
              const std::vector<double> ref = reference_forward(pd, &aux);
              const double floor = 0.1 * rms(ref.data(), (int64_t)ref.size());
              const ErrorStats e = compare(out.data(), ref.data(), (int64_t)out.size(), floor);
              worst_double = std::max(worst_double, e.max_rel);
              MSSM_CHECK(e.max_rel <= 2e-5, "T%lld: float forward vs double reference %.3g", (long long)d.tokens, e.max_rel);
            }
            for_each_level([&](const cpu::KernelTable& kt, const std::string& label) {
              std::vector<float> logits((size_t)(s.tokens * s.experts)), weights((size_t)(s.tokens * s.top_k));
              std::vector<int32_t> indices((size_t)(s.tokens * s.top_k)), counts((size_t)s.experts);
              kt.matmul(p.x.data(), params.router, DType::f32, params.router_bias, logits.data(), s.tokens, s.experts,
                        s.dim);
              kt.moe_route(logits.data(), s.tokens, s.experts, s.top_k, s.scoring, s.renormalize, weights.data(),
                           indices.data(), counts.data());
              cpu::MoeExpertsArgs a;
              a.tokens = s.tokens; a.dim = s.dim; a.hidden = s.hidden; a.experts = s.experts; a.top_k = s.top_k;
              a.x = p.x.data(); a.fc1 = params.fc1; a.fc1_bias = params.fc1_bias; a.fc2 = params.fc2;
              a.fc2_bias = params.fc2_bias; a.activation = s.activation;
              a.indices = indices.data(); a.weights = weights.data();
              std::vector<float> want(out.size());
              a.out = want.data();
              kt.moe_experts(a);
              char what[200];
              std::snprintf(what, sizeof what, "%s T%lld D%lld H%lld E%lld k%lld %s%s %s%s", label.c_str(),
                            (long long)d.tokens, (long long)d.dim, (long long)d.hidden, (long long)d.experts,
                            (long long)d.top_k, scoring_name(scoring), renormalize ? " renorm" : "",
                            activation_name(activation), biases ? " bias" : "");
              // Slots beyond E: index 0 with weight 0 in the kernel, -1 here.
              std::vector<int32_t> mine(saved.indices);
              for (int32_t& i : mine) i = i < 0 ? 0 : i;
              MSSM_CHECK(mine == indices, "%s: chosen experts differ", what);
              expect_close(what, saved.weights.data(), weights.data(), (int64_t)weights.size(), 1e-5, 1e-7);
              const double floor = rms(want.data(), (int64_t)want.size());
              expect_close(what, out.data(), want.data(), (int64_t)out.size(), 1e-5, floor);
              const ErrorStats e = compare(out.data(), want.data(), (int64_t)out.size(), floor);
              const ErrorStats ew = compare(saved.weights.data(), weights.data(), (int64_t)weights.size(), 1e-7);
              double err = 0, norm = 0;
              for (size_t i = 0; i < out.size(); ++i) {
                err += ((double)out[i] - want[i]) * ((double)out[i] - want[i]);
                norm += (double)want[i] * want[i];
              }
              const double nerr = std::sqrt(err / norm);
              MSSM_CHECK(nerr <= 1e-5, "%s: norm-wise %.3g", what, nerr);
              worst_out = std::max(worst_out, e.max_rel);
              worst_norm = std::max(worst_norm, nerr);
              worst_weight = std::max(worst_weight, ew.max_rel);
            });
          }
  std::printf("  float forward vs inference kernels: %d cases × levels × threads; worst out %.3g (elementwise, floor "
              "RMS), %.3g (norm-wise), weights %.3g; vs double reference %.3g (floor 0.1·RMS)\n",
              cases, worst_out, worst_norm, worst_weight, worst_double);
}

// Forward + backward at 1 and 2 threads must agree bit for bit.
template <typename T>
void thread_independence(const char* type) {
  Rng rng(11);
  MoeShape s;
  s.tokens = 301; s.dim = 96; s.hidden = 72; s.experts = 8; s.top_k = 2;
  s.scoring = MoeScoring::softmax; s.renormalize = true; s.activation = Activation::gelu;
  const Problem<T> p = make_problem<T>(rng, s, true);
  const std::vector<T> dout = normals<T>(rng, s.tokens * s.dim, 1.0f);
  struct Result {
    std::vector<T> out, dx, router, router_bias, fc1, fc1_bias, fc2, fc2_bias;
    double aux;
    size_t saved_bytes;
  };
  auto run = [&](int threads) {
    set_num_threads(threads);
    Result r;
    r.out.resize(s.tokens * s.dim);
    r.dx.resize(s.tokens * s.dim);
    r.router.assign(p.router.size(), T(0));
    r.router_bias.assign(p.router_bias.size(), T(0));
    r.fc1.assign(p.fc1.size(), T(0));
    r.fc1_bias.assign(p.fc1_bias.size(), T(0));
    r.fc2.assign(p.fc2.size(), T(0));
    r.fc2_bias.assign(p.fc2_bias.size(), T(0));
    MoeSaved<T> saved;
    train::moe_forward(s, p.params(), p.x.data(), r.out.data(), &saved, &r.aux);
    r.saved_bytes = saved.bytes();
    MoeParamGrads<T> g{r.router.data(), r.router_bias.data(), r.fc1.data(), r.fc1_bias.data(), r.fc2.data(),
                       r.fc2_bias.data()};
    train::moe_backward(s, p.params(), p.x.data(), saved, dout.data(), T(0.01), r.dx.data(), g);
    return r;
  };
  const int threads = default_num_threads();
  const Result one = run(1), two = run(2);
  set_num_threads(threads);
  auto same = [](const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
  };
  MSSM_CHECK(same(one.out, two.out) && one.aux == two.aux, "%s: forward differs between 1 and 2 threads", type);
  MSSM_CHECK(same(one.dx, two.dx), "%s: dx differs between 1 and 2 threads", type);
  MSSM_CHECK(same(one.router, two.router) && same(one.router_bias, two.router_bias),
             "%s: router grads differ between 1 and 2 threads", type);
  MSSM_CHECK(same(one.fc1, two.fc1) && same(one.fc1_bias, two.fc1_bias), "%s: fc1 grads differ", type);
  MSSM_CHECK(same(one.fc2, two.fc2) && same(one.fc2_bias, two.fc2_bias), "%s: fc2 grads differ", type);
  // The check can fail: the gradient is not all zeros, so equal buffers mean equal arithmetic.
  MSSM_CHECK(rms(one.fc1.data(), (int64_t)one.fc1.size()) > 0, "%s: fc1 gradient is zero", type);
  std::printf("  %s: bit-identical at 1 and 2 threads (T%lld D%lld H%lld E%lld k%lld); saved state %zu bytes = %.1f "
              "per token\n",
              type, (long long)s.tokens, (long long)s.dim, (long long)s.hidden, (long long)s.experts,
              (long long)s.top_k, one.saved_bytes, (double)one.saved_bytes / s.tokens);
}

}  // namespace

int main() {
  test_gradients();
  test_checker_can_fail();
  test_float_matches_inference();
  thread_independence<float>("float");
  thread_independence<double>("double");
  return finish("test_train_moe");
}
