// Mixture-of-experts MLP block for training: forward with saved routing and fc1 outputs, backward
// into x and all parameters, and the load-balancing loss. Equations and glossary: moe.h.
//
// Layout of the work: pairs (t, slot) are grouped by expert with a counting sort in (t, slot) order;
// experts run one after another and each of its matmuls splits its rows (or, for weight gradients,
// its output rows) across the pool, so an expert's weights stream through the cache once per call
// and no two threads ever add into the same element.
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../core/threadpool.h"
#include "../cpu/moe_topk.h"
#include "ops.h"

namespace mssm::train {
namespace {

using cpu::Activation;
using cpu::MoeScoring;

// ---- helpers (the products are ops.h's linear, linear_input_grad and weight_grad) -------------------

// Rows per parallel chunk so a chunk holds about `work` multiply-adds.
inline int64_t chunk_rows(int64_t per_row, int64_t work = 32768) {
  return std::max<int64_t>(1, work / std::max<int64_t>(1, per_row));
}

// Σ_k a[k]·b[k] in 8 independent lanes (vectorisable without reassociating flags), then the lanes
// in a fixed order.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) lane[i & 7] += a[i] * b[i];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// ---- activations ------------------------------------------------------------------------------

template <typename T>
inline T activate(T a, Activation activation) {
  switch (activation) {
    case Activation::silu:
      return a / (T(1) + std::exp(-a));
    case Activation::gelu:  // 0.5·a·(1 + erf(a/√2))
      return T(0.5) * a * (T(1) + std::erf(a * T(0.70710678118654752)));
    case Activation::gelu_tanh:  // 0.5·a·(1 + tanh(√(2/π)·(a + 0.044715·a³)))
      return T(0.5) * a * (T(1) + std::tanh(T(0.79788456080286536) * (a + T(0.044715) * a * a * a)));
  }
  return a;
}

template <typename T>
inline T activate_grad(T a, Activation activation) {
  switch (activation) {
    case Activation::silu: {  // σ(a)·(1 + a·(1 − σ(a)))
      const T s = T(1) / (T(1) + std::exp(-a));
      return s * (T(1) + a * (T(1) - s));
    }
    case Activation::gelu:  // Φ(a) + a·φ(a)
      return T(0.5) * (T(1) + std::erf(a * T(0.70710678118654752))) +
             a * T(0.39894228040143268) * std::exp(T(-0.5) * a * a);
    case Activation::gelu_tanh: {
      const T c = T(0.79788456080286536), u = c * (a + T(0.044715) * a * a * a), th = std::tanh(u);
      return T(0.5) * (T(1) + th) + T(0.5) * a * (T(1) - th * th) * c * (T(1) + T(3 * 0.044715) * a * a);
    }
  }
  return T(1);
}

// ---- routing ----------------------------------------------------------------------------------

// scores, top-k and weights of every token from logits [T, E]; the same algorithm as cpu::moe_route.
template <typename T>
void route(const MoeShape& s, const T* logits, MoeSaved<T>& saved) {
  const int64_t E = s.experts, K = s.top_k, k = std::min(K, E);
  T* scores = saved.scores.data();
  T* weights = saved.weights.data();
  int32_t* indices = saved.indices.data();
  parallel_for(s.tokens, chunk_rows(E * (k + 1), 4096), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* row = logits + t * E;
      T* p = scores + t * E;
      if (s.scoring == MoeScoring::softmax) {
        T m = row[0];
        for (int64_t e = 1; e < E; ++e) m = row[e] > m ? row[e] : m;
        T sum = 0;
        for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(row[e] - m);
        const T inv = T(1) / sum;
        for (int64_t e = 0; e < E; ++e) p[e] *= inv;
      } else {
        for (int64_t e = 0; e < E; ++e) p[e] = T(1) / (T(1) + std::exp(-row[e]));
      }
      cpu::TopK<T> top{weights + t * K, indices + t * K, k};
      for (int64_t e = 0; e < E; ++e) top.insert(p[e], (int32_t)e);
      top.finish(K, s.renormalize, -1);
    }
  });
}

// Counting sort of the pairs by expert, in (t, slot) order.
template <typename T>
void group(const MoeShape& s, MoeSaved<T>& saved) {
  const int64_t E = s.experts, pairs = s.tokens * s.top_k;
  saved.counts.assign((size_t)E, 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (saved.indices[p] >= 0) ++saved.counts[saved.indices[p]];
  saved.offsets.assign((size_t)E + 1, 0);
  for (int64_t e = 0; e < E; ++e) saved.offsets[e + 1] = saved.offsets[e] + saved.counts[e];
  saved.pair.resize((size_t)saved.offsets[E]);
  saved.row.resize((size_t)pairs);
  std::vector<int64_t> next(saved.offsets.begin(), saved.offsets.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t e = saved.indices[p];
    if (e < 0) {
      saved.row[p] = -1;
      continue;
    }
    saved.row[p] = next[e];
    saved.pair[next[e]++] = p;
  }
}

// rows [first, first + count) of the grouped order: out[r] = src[token(r)]  (D wide).
template <typename T>
void gather(const T* src, const int64_t* pair, int64_t k, int64_t count, int64_t D, T* out) {
  parallel_for(count, chunk_rows(D, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(out + r * D, src + (pair[r] / k) * D, (size_t)D * sizeof(T));
  });
}

}  // namespace

template <typename T>
size_t MoeSaved<T>::bytes() const {
  return indices.size() * sizeof(int32_t) + weights.size() * sizeof(T) + scores.size() * sizeof(T) +
         counts.size() * sizeof(int32_t) + offsets.size() * sizeof(int64_t) + pair.size() * sizeof(int64_t) +
         row.size() * sizeof(int64_t) + hidden.size() * sizeof(T);
}

template <typename T>
void moe_forward(const MoeShape& s, const MoeParams<T>& params, const T* x, T* out, MoeSaved<T>* saved_out,
                 double* aux_loss) {
  const int64_t Tn = s.tokens, D = s.dim, H = s.hidden, E = s.experts, K = s.top_k;
  if (aux_loss) *aux_loss = 0;
  MoeSaved<T> local;
  MoeSaved<T>& saved = saved_out ? *saved_out : local;
  saved.indices.assign((size_t)(Tn * K), -1);
  saved.weights.assign((size_t)(Tn * K), T(0));
  saved.scores.assign((size_t)(Tn * E), T(0));
  if (Tn <= 0 || D <= 0 || E <= 0 || K <= 0) {
    if (Tn > 0 && D > 0) std::fill(out, out + Tn * D, T(0));
    saved.counts.assign((size_t)std::max<int64_t>(E, 0), 0);
    saved.offsets.assign((size_t)std::max<int64_t>(E, 0) + 1, 0);
    saved.pair.clear();
    saved.row.assign((size_t)std::max<int64_t>(Tn * K, 0), -1);
    saved.hidden.clear();
    return;
  }

  std::vector<T> logits((size_t)(Tn * E));
  linear(x, params.router, params.router_bias, logits.data(), Tn, E, D);
  route(s, logits.data(), saved);
  group(s, saved);

  const int64_t rows = saved.offsets[E];
  saved.hidden.resize((size_t)(rows * 2 * H));
  std::vector<T> gathered((size_t)(rows * D)), glu, expert_out((size_t)(rows * D));
  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) max_rows = std::max<int64_t>(max_rows, saved.counts[e]);
  glu.resize((size_t)(max_rows * H));
  gather(x, saved.pair.data(), K, rows, D, gathered.data());

  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = saved.offsets[e], count = saved.counts[e];
    if (count == 0) continue;
    T* h = saved.hidden.data() + first * 2 * H;
    linear(gathered.data() + first * D, params.fc1 + e * 2 * H * D, params.fc1_bias ? params.fc1_bias + e * 2 * H : nullptr,
           h, count, 2 * H, D);
    parallel_for(count, chunk_rows(H, 4096), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* a = h + r * 2 * H;
        T* g = glu.data() + r * H;
        for (int64_t i = 0; i < H; ++i) g[i] = activate(a[i], s.activation) * a[H + i];
      }
    });
    linear(glu.data(), params.fc2 + e * D * H, params.fc2_bias ? params.fc2_bias + e * D : nullptr,
           expert_out.data() + first * D, count, D, H);
  }

  // Combine per token in slot order.
  parallel_for(Tn, chunk_rows(D * K, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* o = out + t * D;
      std::fill(o, o + D, T(0));
      for (int64_t slot = 0; slot < K; ++slot) {
        const int64_t r = saved.row[t * K + slot];
        if (r < 0) continue;
        const T w = saved.weights[t * K + slot];
        const T* y = expert_out.data() + r * D;
        for (int64_t i = 0; i < D; ++i) o[i] += w * y[i];
      }
    }
  });

  if (aux_loss) {
    const double assignments = (double)Tn * (double)std::min(K, E);
    double aux = 0;
    for (int64_t e = 0; e < E; ++e) {
      double P = 0;
      for (int64_t t = 0; t < Tn; ++t) P += (double)saved.scores[t * E + e];
      aux += (saved.counts[e] / assignments) * (P / (double)Tn);
    }
    *aux_loss = (double)E * aux;
  }
}

template <typename T>
void moe_backward(const MoeShape& s, const MoeParams<T>& params, const T* x, const MoeSaved<T>& saved,
                  const T* dout, T aux_weight, T* dx, const MoeParamGrads<T>& grads) {
  const int64_t Tn = s.tokens, D = s.dim, H = s.hidden, E = s.experts, K = s.top_k, k = std::min(K, E);
  if (Tn <= 0 || D <= 0) return;
  std::fill(dx, dx + Tn * D, T(0));
  if (E <= 0 || K <= 0) return;
  const int64_t rows = saved.offsets[E];

  int64_t max_rows = 0;
  for (int64_t e = 0; e < E; ++e) max_rows = std::max<int64_t>(max_rows, saved.counts[e]);
  std::vector<T> gathered_x((size_t)(max_rows * D)), gathered_dout((size_t)(max_rows * D));
  std::vector<T> glu((size_t)(max_rows * H)), dglu((size_t)(max_rows * H)), dh((size_t)(max_rows * 2 * H));
  std::vector<T> dx_rows((size_t)(rows * D));
  std::vector<T> scratch;  // linear_input_grad's Wᵀ
  std::vector<T> dweights((size_t)(Tn * K), T(0));

  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = saved.offsets[e], count = saved.counts[e];
    if (count == 0) continue;
    const int64_t* pair = saved.pair.data() + first;
    const T* h = saved.hidden.data() + first * 2 * H;
    const T* fc1 = params.fc1 + e * 2 * H * D;
    const T* fc2 = params.fc2 + e * D * H;
    const T* b2 = params.fc2_bias ? params.fc2_bias + e * D : nullptr;
    gather(dout, pair, K, count, D, gathered_dout.data());

    // dglu_unweighted[r] = fc2ᵀ·dout_t; ∂L/∂w(t,slot) = dglu_unweighted·g + dout_t·b2 (= dout_t·o).
    linear_input_grad(gathered_dout.data(), fc2, dglu.data(), count, D, H, false, scratch);
    parallel_for(count, chunk_rows(3 * H + D, 4096), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* a = h + r * 2 * H;
        T* g = glu.data() + r * H;
        T* dg = dglu.data() + r * H;
        T* dhr = dh.data() + r * 2 * H;
        T* dd = gathered_dout.data() + r * D;
        for (int64_t i = 0; i < H; ++i) g[i] = activate(a[i], s.activation) * a[H + i];
        T dw = dot(dg, g, H);
        if (b2) dw += dot(dd, b2, D);
        dweights[pair[r]] = dw;
        const T w = saved.weights[pair[r]];
        for (int64_t i = 0; i < H; ++i) {
          dg[i] *= w;
          dhr[i] = dg[i] * a[H + i] * activate_grad(a[i], s.activation);
          dhr[H + i] = dg[i] * activate(a[i], s.activation);
        }
        for (int64_t i = 0; i < D; ++i) dd[i] *= w;  // now ∂L/∂o of this row
      }
    });
    weight_grad(gathered_dout.data(), glu.data(), grads.fc2 ? grads.fc2 + e * D * H : nullptr,
                grads.fc2_bias ? grads.fc2_bias + e * D : nullptr, count, D, H);
    if (grads.fc1) gather(x, pair, K, count, D, gathered_x.data());
    weight_grad(dh.data(), gathered_x.data(), grads.fc1 ? grads.fc1 + e * 2 * H * D : nullptr,
                grads.fc1_bias ? grads.fc1_bias + e * 2 * H : nullptr, count, 2 * H, D);
    linear_input_grad(dh.data(), fc1, dx_rows.data() + first * D, count, 2 * H, D, false, scratch);
  }

  // ∂L/∂logits: chosen weights (through the renormalisation) and the load-balancing loss, then
  // softmax / sigmoid. d aux/d p[t,e] = E·f_e/T.
  std::vector<T> dlogits((size_t)(Tn * E));
  std::vector<T> aux_grad((size_t)E, T(0));
  if (aux_weight != T(0)) {
    const double assignments = (double)Tn * (double)k;
    for (int64_t e = 0; e < E; ++e)
      aux_grad[e] = (T)((double)aux_weight * (double)E * (saved.counts[e] / assignments) / (double)Tn);
  }
  parallel_for(Tn, chunk_rows(E + K, 4096), [&](int64_t begin, int64_t end) {
    std::vector<T> dp((size_t)E);
    for (int64_t t = begin; t < end; ++t) {
      const T* p = saved.scores.data() + t * E;
      const T* w = saved.weights.data() + t * K;
      const int32_t* chosen = saved.indices.data() + t * K;
      const T* dw = dweights.data() + t * K;
      for (int64_t e = 0; e < E; ++e) dp[e] = aux_grad[e];
      if (s.renormalize) {
        // w_j = p_j / S, S = Σ_j p_j:  ∂L/∂p_j = (∂L/∂w_j − Σ_i ∂L/∂w_i·w_i) / S
        T S = 0, wdw = 0;
        for (int64_t j = 0; j < k; ++j) {
          S += p[chosen[j]];
          wdw += dw[j] * w[j];
        }
        for (int64_t j = 0; j < k; ++j) dp[chosen[j]] += (dw[j] - wdw) / S;
      } else {
        for (int64_t j = 0; j < k; ++j) dp[chosen[j]] += dw[j];
      }
      T* dl = dlogits.data() + t * E;
      if (s.scoring == MoeScoring::softmax) {
        T pdp = 0;
        for (int64_t e = 0; e < E; ++e) pdp += p[e] * dp[e];
        for (int64_t e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - pdp);
      } else {
        for (int64_t e = 0; e < E; ++e) dl[e] = dp[e] * p[e] * (T(1) - p[e]);
      }
    }
  });

  // dx_t = W_routerᵀ·dlogits_t + Σ_slot dx_rows(t, slot), slots in order.
  linear_input_grad(dlogits.data(), params.router, dx, Tn, E, D, false, scratch);
  parallel_for(Tn, chunk_rows(D * K, 16384), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* d = dx + t * D;
      for (int64_t slot = 0; slot < K; ++slot) {
        const int64_t r = saved.row[t * K + slot];
        if (r < 0) continue;
        const T* y = dx_rows.data() + r * D;
        for (int64_t i = 0; i < D; ++i) d[i] += y[i];
      }
    }
  });
  weight_grad(dlogits.data(), x, grads.router, grads.router_bias, Tn, E, D);
}

template struct MoeSaved<float>;
template struct MoeSaved<double>;
template void moe_forward<float>(const MoeShape&, const MoeParams<float>&, const float*, float*, MoeSaved<float>*,
                                 double*);
template void moe_forward<double>(const MoeShape&, const MoeParams<double>&, const double*, double*,
                                  MoeSaved<double>*, double*);
template void moe_backward<float>(const MoeShape&, const MoeParams<float>&, const float*, const MoeSaved<float>&,
                                  const float*, float, float*, const MoeParamGrads<float>&);
template void moe_backward<double>(const MoeShape&, const MoeParams<double>&, const double*, const MoeSaved<double>&,
                                   const double*, double, double*, const MoeParamGrads<double>&);

}  // namespace mssm::train
