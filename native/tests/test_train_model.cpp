// The trainer's whole-model gradient (native/train/trainer.h) against central finite differences in
// double precision, for Mamba-1 and Mamba-2 configurations that use every optional part (biases, an
// untied or tied head, B/C groups, an active dt clamp, the scan recomputed in chunks shorter than the
// sequence), and with mixture-of-experts blocks (the load-balancing loss included); the float trainer
// against the double one; its loss against the inference model's logits; gradient accumulation over
// micro-batches; and AdamW against a scalar transcription of its rule.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <unordered_map>
#include <vector>

#include "../model/mamba_model.h"
#include "../train/trainer.h"
#include "test_util.h"

using mssm::model::Architecture;
using mssm::model::Config;
using mssm::test::Rng;
using mssm::train::ParamSlot;
using mssm::train::Trainer;

namespace {

Config mamba1_config() {
  Config c;
  c.architecture = Architecture::mamba1;
  c.hidden_size = 6;
  c.num_layers = 2;
  c.vocab_size = 7;
  c.intermediate_size = 10;
  c.state_size = 3;
  c.conv_kernel = 3;
  c.time_step_rank = 2;
  c.use_bias = true;
  c.use_conv_bias = true;
  c.tie_embeddings = false;
  return c;
}

Config mamba2_config() {
  Config c;
  c.architecture = Architecture::mamba2;
  c.hidden_size = 8;
  c.num_layers = 2;
  c.vocab_size = 9;
  c.intermediate_size = 12;
  c.num_heads = 4;
  c.head_dim = 3;
  c.num_groups = 2;
  c.state_size = 3;
  c.conv_kernel = 4;
  c.chunk_size = 4;
  c.use_bias = true;
  c.use_conv_bias = true;
  c.tie_embeddings = true;
  c.time_step_min = 0.002f;
  c.time_step_max = 0.08f;  // some heads' dt lands above: the clamp is exercised
  return c;
}

// Mamba layers with MoE blocks among them (BlackMamba).
Config mamba1_moe_config() {
  Config c = mamba1_config();
  c.num_layers = 3;
  c.moe = {{1}, 4, 2, 5, mssm::cpu::MoeScoring::softmax, true, mssm::cpu::Activation::silu, true};
  return c;
}

Config mamba2_moe_config() {
  Config c = mamba2_config();
  c.num_layers = 3;
  c.moe = {{0}, 3, 1, 4, mssm::cpu::MoeScoring::sigmoid, false, mssm::cpu::Activation::gelu, false};
  return c;
}

// Parameters in realistic ranges: A_log = log(1..N) (+ noise), dt_bias = softplus⁻¹(dt ∈ [0.005, 0.15]),
// D and the norms near 1, matrices uniform ±scale/sqrt(fan_in) with the rows that make B and C larger,
// so the recurrence carries a real share of y and every gradient is far from zero.
template <typename T>
void fill_params(Trainer<T>& t, uint64_t seed) {
  Rng rng(seed);
  const Config& c = t.config();
  for (const ParamSlot& s : t.slots()) {
    T* p = t.params() + s.offset;
    const std::string base = s.name.substr(s.name.rfind('.') + 1);
    const int64_t fan_in = s.shape.back();
    for (int64_t i = 0; i < s.count; ++i) {
      double v;
      if (base == "A_log") {
        v = std::log((double)(c.mamba1() ? i % c.state_size + 1 : i + 1)) + 0.1 * rng.normal();
      } else if (base == "dt_bias") {
        const double dt = 0.005 + 0.145 * rng.uniform();
        v = dt + std::log(-std::expm1(-dt));
      } else if (base == "D" || base == "norm" || base == "norm_f" || base == "ssm_norm") {
        v = 1.0 + 0.2 * rng.normal();
      } else if (base == "embeddings" || base == "lm_head") {
        v = 0.5 * rng.normal();
      } else {
        v = (2 * rng.uniform() - 1) / std::sqrt((double)fan_in);
        if (base == "in_proj" || base == "x_proj") v *= 2.5;
      }
      p[i] = (T)v;
    }
  }
}

struct Batch {
  int64_t batch, length;
  std::vector<int32_t> ids, targets;
};

Batch random_batch(const Config& c, int64_t batch, int64_t length, uint64_t seed) {
  Rng rng(seed);
  Batch b{batch, length, {}, {}};
  for (int64_t i = 0; i < batch * length; ++i) {
    b.ids.push_back((int32_t)(rng.next() % c.vocab_size));
    b.targets.push_back((int32_t)(rng.next() % c.vocab_size));
  }
  b.targets[1] = -1;  // one ignored position
  return b;
}

// ‖a − b‖∞ / max(‖b‖∞, floor)
double rel_inf(const double* a, const double* b, int64_t n, double floor = 1e-12) {
  double err = 0, ref = floor;
  for (int64_t i = 0; i < n; ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    ref = std::max(ref, std::fabs(b[i]));
  }
  return err / ref;
}

// Every parameter's gradient against (L(θ+h) − L(θ−h)) / 2h of the double loss, on up to `per_tensor`
// entries of each tensor (all of the small ones). L is the objective the backward differentiates: the
// summed cross-entropy plus, with MoE blocks, count · aux_weight · Σ load-balancing losses (trainer.h).
// Returns the worst tensor-wise relative error.
double check_finite_differences(const Config& c, int64_t chunk, const Batch& b, int per_tensor, const char* label) {
  Trainer<double> t(c, chunk);
  fill_params(t, 11);
  if (!c.moe.layers.empty()) t.set_aux_weight(0.3);  // large enough that its gradient shows
  t.zero_grads();
  const mssm::train::BatchLoss base = t.forward_backward(b.ids.data(), b.targets.data(), b.batch, b.length, true, 1.0);
  const double aux_factor = (double)base.count * t.aux_weight();
  MSSM_CHECK(c.moe.layers.empty() ? base.aux == 0 : base.aux > 0, "%s: load-balancing loss %.3g", label, base.aux);
  auto objective = [&]() {
    const mssm::train::BatchLoss l = t.forward_backward(b.ids.data(), b.targets.data(), b.batch, b.length, false, 1.0);
    return l.sum + aux_factor * l.aux;
  };
  const double h = 1e-5;
  double worst = 0;
  Rng pick(5);
  for (const ParamSlot& s : t.slots()) {
    std::vector<int64_t> entries;
    if (s.count <= per_tensor) {
      for (int64_t i = 0; i < s.count; ++i) entries.push_back(i);
    } else {
      for (int i = 0; i < per_tensor; ++i) entries.push_back((int64_t)(pick.next() % s.count));
    }
    std::vector<double> fd, an;
    for (int64_t e : entries) {
      double* p = t.params() + s.offset + e;
      const double saved = *p;
      *p = saved + h;
      const double up = objective();
      *p = saved - h;
      const double down = objective();
      *p = saved;
      fd.push_back((up - down) / (2 * h));
      an.push_back(t.grads()[s.offset + e]);
    }
    double gmax = 0;
    for (int64_t i = 0; i < s.count; ++i) gmax = std::max(gmax, std::fabs(t.grads()[s.offset + i]));
    const double err = rel_inf(an.data(), fd.data(), (int64_t)fd.size(), 1e-3 * gmax + 1e-12);
    MSSM_CHECK(err < 1e-6, "%s: %s gradient vs finite differences: relative error %.3g", label, s.name.c_str(), err);
    MSSM_CHECK(gmax > 1e-6, "%s: %s gradient is ~0 (max %.3g): the check would be vacuous", label, s.name.c_str(), gmax);
    worst = std::max(worst, err);
  }
  return worst;
}

// The loss of the float trainer equals the cross-entropy of the inference model's logits on the same
// weights (A = -exp(A_log)), and its gradient the double trainer's.
void check_float_against_double_and_inference(const Config& c, int64_t chunk, const char* label) {
  const Batch b = random_batch(c, 3, 37, 21);
  Trainer<double> td(c, chunk);
  fill_params(td, 3);
  Trainer<float> tf(c, chunk);
  for (int64_t i = 0; i < td.parameter_count(); ++i) tf.params()[i] = (float)td.params()[i];
  for (int64_t i = 0; i < td.parameter_count(); ++i) td.params()[i] = (double)tf.params()[i];
  td.zero_grads();
  tf.zero_grads();
  const double ld = td.forward_backward(b.ids.data(), b.targets.data(), b.batch, b.length, true, 1.0).sum;
  const auto lf = tf.forward_backward(b.ids.data(), b.targets.data(), b.batch, b.length, true, 1.0f);
  MSSM_CHECK(std::fabs(lf.sum - ld) <= 1e-5 * std::fabs(ld), "%s: float loss %.9g vs double %.9g", label, lf.sum, ld);
  MSSM_CHECK(lf.count == b.batch * b.length - 1, "%s: %lld tokens counted", label, (long long)lf.count);
  double worst = 0;
  for (const ParamSlot& s : tf.slots()) {
    std::vector<double> gf(tf.grads() + s.offset, tf.grads() + s.offset + s.count);
    const double err = rel_inf(gf.data(), td.grads() + s.offset, s.count);
    MSSM_CHECK(err < 1e-4, "%s: %s float gradient vs double: %.3g", label, s.name.c_str(), err);
    worst = std::max(worst, err);
  }
  std::printf("  %s: float vs double gradient, worst tensor %.2e\n", label, worst);

  // Inference: canonical weights, logits of every token, cross-entropy in double.
  std::vector<std::vector<float>> storage;
  std::unordered_map<std::string, mssm::model::Weight> weights;
  for (const ParamSlot& s : tf.slots()) {
    std::vector<float> v(tf.params() + s.offset, tf.params() + s.offset + s.count);
    std::string name = s.name;
    if (name.size() > 6 && name.compare(name.size() - 6, 6, ".A_log") == 0) {
      name = name.substr(0, name.size() - 4);
      for (float& x : v) x = -std::exp(x);
    }
    storage.push_back(std::move(v));
    mssm::model::Weight w;
    w.data = storage.back().data();
    w.dtype = mssm::DType::f32;
    w.shape = s.shape;
    w.bytes = s.count * 4;
    weights.emplace(name, w);
  }
  mssm::model::Model model(c, weights);
  std::vector<int64_t> lengths(b.batch, b.length);
  std::vector<float> logits(b.batch * b.length * c.vocab_size);
  mssm::model::ForwardArgs fa;
  fa.ids = b.ids.data();
  fa.lengths = lengths.data();
  fa.sequences = b.batch;
  fa.logits = logits.data();
  model.forward(fa);
  double ce = 0;
  for (int64_t r = 0; r < b.batch * b.length; ++r) {
    if (b.targets[r] < 0) continue;
    const float* row = logits.data() + r * c.vocab_size;
    double mx = row[0], sum = 0;
    for (int64_t v = 1; v < c.vocab_size; ++v) mx = std::max(mx, (double)row[v]);
    for (int64_t v = 0; v < c.vocab_size; ++v) sum += std::exp(row[v] - mx);
    ce += mx + std::log(sum) - row[b.targets[r]];
  }
  MSSM_CHECK(std::fabs(ce - lf.sum) <= 2e-5 * std::fabs(ce), "%s: trainer loss %.9g vs inference model %.9g", label,
             lf.sum, ce);
  std::printf("  %s: trainer loss %.6f, inference model %.6f\n", label, lf.sum, ce);
}

// Two micro-batches with loss_scale 1/2 each give the gradient of the mean of the two; and results
// do not depend on the number of threads. (The load-balancing loss is one per micro-batch, of its
// tokens' routing, so it is not additive over micro-batches: the accumulation check runs without it.)
void check_accumulation_and_threads(const Config& c, const char* label) {
  const Batch a = random_batch(c, 2, 19, 41), b = random_batch(c, 2, 19, 42);
  Batch both{4, 19, a.ids, a.targets};
  both.ids.insert(both.ids.end(), b.ids.begin(), b.ids.end());
  both.targets.insert(both.targets.end(), b.targets.begin(), b.targets.end());
  Trainer<double> t(c, 8);
  fill_params(t, 9);
  t.set_aux_weight(0);
  t.zero_grads();
  t.forward_backward(a.ids.data(), a.targets.data(), 2, 19, true, 0.5);
  t.forward_backward(b.ids.data(), b.targets.data(), 2, 19, true, 0.5);
  std::vector<double> accumulated(t.grads(), t.grads() + t.parameter_count());
  t.zero_grads();
  t.forward_backward(both.ids.data(), both.targets.data(), 4, 19, true, 0.5);
  const double err = rel_inf(accumulated.data(), t.grads(), t.parameter_count());
  MSSM_CHECK(err < 1e-12, "%s: two accumulated micro-batches vs one batch: %.3g", label, err);

  Trainer<float> f(c, 8);
  for (int64_t i = 0; i < t.parameter_count(); ++i) f.params()[i] = (float)t.params()[i];
  const int threads = mssm::num_threads();
  std::vector<std::vector<float>> grads;
  for (int n : {1, 2, 3}) {
    mssm::set_num_threads(n);
    f.zero_grads();
    f.forward_backward(both.ids.data(), both.targets.data(), 4, 19, true, 1.0f);
    grads.emplace_back(f.grads(), f.grads() + f.parameter_count());
  }
  mssm::set_num_threads(threads);
  std::vector<double> g0(grads[0].begin(), grads[0].end());
  for (size_t k = 1; k < grads.size(); ++k) {
    std::vector<double> gk(grads[k].begin(), grads[k].end());
    const double e = rel_inf(gk.data(), g0.data(), (int64_t)g0.size());
    MSSM_CHECK(e <= 1e-6, "%s: gradient with %zu threads vs 1: %.3g", label, k + 1, e);
  }
}

void check_adamw() {
  Config c = mamba1_config();
  Trainer<float> t(c, 4);
  fill_params(t, 1);
  const int64_t n = t.parameter_count();
  Rng rng(2);
  std::vector<float> m(n), v(n), g(n);
  for (int64_t i = 0; i < n; ++i) {
    m[i] = 0.01f * rng.normal();
    v[i] = 1e-4f * rng.uniform();
    g[i] = 0.1f * rng.normal();
  }
  std::vector<double> p(t.params(), t.params() + n), md(m.begin(), m.end()), vd(v.begin(), v.end());
  mssm::train::AdamWParams a;
  a.lr = 3e-3;
  a.beta1 = 0.9;
  a.beta2 = 0.95;
  a.eps = 1e-8;
  a.weight_decay = 0.1;
  a.step = 7;
  mssm::train::adamw_update(t.params(), g.data(), m.data(), v.data(), t.slots(), a);
  double worst = 0;
  for (const ParamSlot& s : t.slots()) {
    for (int64_t j = s.offset; j < s.offset + s.count; ++j) {
      double q = p[j];
      if (s.decay) q -= a.lr * a.weight_decay * q;
      md[j] = a.beta1 * md[j] + (1 - a.beta1) * g[j];
      vd[j] = a.beta2 * vd[j] + (1 - a.beta2) * (double)g[j] * g[j];
      const double mh = md[j] / (1 - std::pow(a.beta1, 7)), vh = vd[j] / (1 - std::pow(a.beta2, 7));
      q -= a.lr * mh / (std::sqrt(vh) + a.eps);
      worst = std::max(worst, std::fabs(q - t.params()[j]) / a.lr);
    }
  }
  // Relative to lr, the size of a full Adam step (float rounding of p ≈ 1 alone is 2e-5 of it).
  MSSM_CHECK(worst < 1e-4, "adamw: parameters differ from the rule by %.3g of lr", worst);
  const ParamSlot* norm = t.slot("layers.0.norm");
  const ParamSlot* in_proj = t.slot("layers.0.in_proj");
  const ParamSlot* a_log = t.slot("layers.0.A_log");
  MSSM_CHECK(norm && !norm->decay && in_proj && in_proj->decay && a_log && !a_log->decay,
             "adamw: decay applies to matrices only (norm %d, in_proj %d, A_log %d)", norm && norm->decay,
             in_proj && in_proj->decay, a_log && a_log->decay);
}

// optimizer_step clips to the global norm before AdamW, counts the step and zeroes the gradients; a
// non-finite gradient takes no step.
void check_optimizer_step() {
  Config c = mamba1_config();
  Trainer<float> a(c, 4), b(c, 4);
  fill_params(a, 5);
  std::copy(a.params(), a.params() + a.parameter_count(), b.params());
  Rng rng(6);
  for (int64_t i = 0; i < a.parameter_count(); ++i) a.grads()[i] = b.grads()[i] = 0.3f * rng.normal();
  const int64_t n = a.parameter_count();
  std::vector<float> ma(n, 0.0f), va(n, 0.0f), mb(n, 0.0f), vb(n, 0.0f);
  mssm::train::AdamWParams hyper;
  hyper.lr = 1e-2;
  const double norm = a.grad_norm(), max_norm = norm / 4;
  int64_t step = 0;
  const double returned = mssm::train::optimizer_step(a, ma.data(), va.data(), hyper, max_norm, &step);
  MSSM_CHECK(returned == norm && step == 1, "optimizer_step returned norm %g (want %g) at step %lld", returned, norm,
             (long long)step);
  // The same step by hand: gradients scaled to the clipped norm, then AdamW at step 1.
  b.scale_grads(max_norm / (norm + 1e-6));
  hyper.step = 1;
  mssm::train::adamw_update(b.params(), b.grads(), mb.data(), vb.data(), b.slots(), hyper);
  bool same = true, zeroed = true;
  for (int64_t i = 0; i < n; ++i) {
    same = same && a.params()[i] == b.params()[i] && ma[i] == mb[i] && va[i] == vb[i];
    zeroed = zeroed && a.grads()[i] == 0.0f;
  }
  MSSM_CHECK(same, "optimizer_step differs from clipping then adamw_update");
  MSSM_CHECK(zeroed, "optimizer_step leaves the gradients zeroed");

  std::vector<float> before(a.params(), a.params() + n);
  a.grads()[3] = NAN;
  bool threw = false;
  try {
    mssm::train::optimizer_step(a, ma.data(), va.data(), hyper, max_norm, &step);
  } catch (const std::runtime_error& e) {
    threw = std::string(e.what()).find("not finite") != std::string::npos;
  }
  MSSM_CHECK(threw && step == 1 && std::equal(before.begin(), before.end(), a.params()) && a.grads()[3] == 0.0f,
             "a non-finite gradient is refused without a step (threw %d, step %lld)", threw, (long long)step);
}

void check_errors() {
  Trainer<float> t(mamba1_config(), 4);
  std::vector<int32_t> ids = {1, 2, 7}, targets = {1, 2, 3};
  bool threw = false;
  try {
    t.forward_backward(ids.data(), targets.data(), 1, 3, false, 1.0f);
  } catch (const std::out_of_range& e) {
    threw = std::string(e.what()).find("token id 7 at position 2") != std::string::npos;
  }
  MSSM_CHECK(threw, "an id outside the vocabulary is refused, naming it and its position");
  ids[2] = 3;
  targets[0] = 9;
  threw = false;
  try {
    t.forward_backward(ids.data(), targets.data(), 1, 3, false, 1.0f);
  } catch (const std::out_of_range& e) {
    threw = std::string(e.what()).find("target 9 at position 0") != std::string::npos;
  }
  MSSM_CHECK(threw, "a target outside the vocabulary is refused");
}

}  // namespace

int main() {
  std::printf("test_train_model (level %s)\n", mssm::cpu::kernels().level);
  {
    const Config c = mamba1_config();
    const double w1 = check_finite_differences(c, 2, random_batch(c, 2, 5, 1), 24, "mamba1 chunk 2");
    const double w2 = check_finite_differences(c, 64, random_batch(c, 1, 9, 2), 12, "mamba1 chunk 64, batch 1");
    std::printf("  mamba1: finite differences, worst tensor %.2e / %.2e\n", w1, w2);
  }
  {
    const Config c = mamba2_config();
    const double w1 = check_finite_differences(c, 3, random_batch(c, 2, 7, 3), 24, "mamba2 chunk 3");
    Config untied = c;
    untied.tie_embeddings = false;
    untied.use_bias = false;
    untied.norm_before_gate = true;
    untied.num_groups = 1;
    const double w2 = check_finite_differences(untied, 1, random_batch(untied, 1, 6, 4), 12, "mamba2 untied, gate after norm");
    std::printf("  mamba2: finite differences, worst tensor %.2e / %.2e\n", w1, w2);
  }
  {
    const Config c = mamba1_moe_config();
    const double w1 = check_finite_differences(c, 2, random_batch(c, 2, 5, 5), 24, "mamba1 + moe top-2 softmax");
    const Config c2 = mamba2_moe_config();
    const double w2 = check_finite_differences(c2, 3, random_batch(c2, 2, 7, 6), 24, "mamba2 + moe top-1 sigmoid");
    std::printf("  moe: finite differences, worst tensor %.2e / %.2e\n", w1, w2);
  }
  check_float_against_double_and_inference(mamba1_config(), 8, "mamba1");
  check_float_against_double_and_inference(mamba1_moe_config(), 8, "mamba1 + moe");
  check_float_against_double_and_inference(mamba2_moe_config(), 8, "mamba2 + moe");
  {
    Config c = mamba2_config();
    c.time_step_min = 0;
    c.time_step_max = __builtin_huge_valf();
    check_float_against_double_and_inference(c, 8, "mamba2");
  }
  check_accumulation_and_threads(mamba1_config(), "mamba1");
  check_accumulation_and_threads(mamba2_config(), "mamba2");
  check_accumulation_and_threads(mamba1_moe_config(), "mamba1 + moe");
  check_adamw();
  check_optimizer_step();
  check_errors();
  std::printf("%d checks, %d failures\n", mssm::test::checks(), mssm::test::failures());
  return mssm::test::failures() ? 1 : 0;
}
