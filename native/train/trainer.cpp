// The model-level forward and backward of trainer.h, and AdamW.
//
// The forward follows mamba_model.cpp's order exactly (in_proj, causal conv + SiLU, the selective scan
// or its Mamba-2 form, the gated norm, out_proj, residuals, final norm, head) with the training ops of
// ops.h, keeping what the backward needs; the backward walks the layers last to first. The products
// are ops.h's linear (y = x·Wᵀ), linear_input_grad (dX = dY·W) and weight_grad (dW += dYᵀ·X).
//
// Mamba-2's scan is the chunked SSD of ssd_chunked.h (small matrix products per chunk of scan_chunk
// tokens, the states recomputed from the chunk boundaries in the backward). MoE blocks are moe.h's.
#include "trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>

#include "../core/large_alloc.h"
#include "../core/threadpool.h"
#include "moe.h"
#include "ops.h"
#include "ssd_chunked.h"

namespace mssm::train {

namespace {

using model::Config;

// Columns [first, first + count) of `rows` rows of width `width`, to or from a packed [rows, count].
template <typename T>
void take_columns(const T* src, int64_t rows, int64_t width, int64_t first, int64_t count, T* dst) {
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * count, src + r * width + first, count * sizeof(T));
  });
}
template <typename T>
void put_columns(const T* src, int64_t rows, int64_t width, int64_t first, int64_t count, T* dst) {
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) std::memcpy(dst + r * width + first, src + r * count, count * sizeof(T));
  });
}

// out = a + b, elementwise over n values.
template <typename T>
void add(const T* a, const T* b, T* out, int64_t n) {
  parallel_for(n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A vector whose resize leaves new elements uninitialised: every buffer of forward_backward is written
// whole (the ops' (=) outputs) or filled explicitly before it is read, and the buffers change size
// within a step (tmp and packed serve several shapes), where value-initialising resizes zero-filled
// about 100 MB a step (6% of a Mamba-1 step of 4 × 1024 tokens). Its memory comes from large_alloc
// (huge pages for large buffers).
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitAllocator<U>;
  };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) noexcept {}
  T* allocate(size_t n) { return static_cast<T*>(large_alloc(n * sizeof(T))); }
  void deallocate(T* p, size_t n) noexcept { large_free(p, n * sizeof(T)); }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Buffer = std::vector<T, UninitAllocator<T>>;

// What one layer's forward keeps for its backward.
template <typename T>
struct LayerSaved {
  Buffer<T> resid;     // [rows, d]   the layer's input (residual stream)
  Buffer<T> rstd;      // [rows]
  Buffer<T> hn;        // [rows, d]   rmsnorm(resid)·norm
  Buffer<T> z;         // [rows, di]
  Buffer<T> conv_in;   // Mamba-1 x [rows, di]; Mamba-2 xBC [rows, di + 2GN] (before the conv)
  Buffer<T> u;         // [rows, di]  the scan's input (the conv's output; Mamba-2: its x part)
  Buffer<T> dt_low;    // Mamba-1 [rows, R]
  Buffer<T> Bm, Cm;    // [rows, G·N]
  Buffer<T> delta;     // Mamba-1 [rows, di] (before the bias); Mamba-2 dt [rows, H]
  Buffer<T> y;         // [rows, di]  the scan's output (Mamba-1: gated)
  Buffer<T> yn;        // Mamba-2 [rows, di] the gated norm's output
  Buffer<T> rstd_g;    // Mamba-2 [rows, G]
  Buffer<T> boundary;  // the scan's chunk-start states
  MoeSaved<T> moe;          // MoE blocks: the routing and the experts' fc1 outputs
};

}  // namespace

// Buffers of forward_backward kept between calls, so a training loop neither allocates nor faults in
// fresh pages every micro-batch (that measured a third of a step at 4 × 1024 tokens).
template <typename T>
struct TrainerWorkspace {
  std::vector<LayerSaved<T>> saved;
  std::vector<T> scratch;  // linear_input_grad's
  Buffer<T> A, tmp, resid, h, rstd_f, hf, logits, dhf, g, dy, du, ddelta, dB, dC, dz, dA, packed, dhn,
      ddt;
};

// ---- Parameters -------------------------------------------------------------------------------

std::vector<ParamSlot> parameter_slots(const Config& config) {
  std::vector<ParamSlot> slots;
  int64_t offset = 0;
  for (const model::WeightSpec& spec : model::expected_weights(config)) {
    ParamSlot s;
    const std::string base = spec.name.substr(spec.name.rfind('.') + 1);
    s.name = base == "A" ? spec.name + "_log" : spec.name;
    s.shape = spec.shape;
    s.count = 1;
    for (int64_t v : spec.shape) s.count *= v;
    s.offset = offset;
    // Rounded to whole cache lines so no two tensors share one.
    offset += (s.count + 15) / 16 * 16;
    s.decay = spec.matrix || base == "conv";
    slots.push_back(std::move(s));
  }
  return slots;
}

template <typename T>
Trainer<T>::Trainer(const Config& config, int64_t scan_chunk) : config_(config), scan_chunk_(scan_chunk) {
  model::validate_config(config_);
  ws_ = std::make_unique<TrainerWorkspace<T>>();
  if (scan_chunk_ < 1) throw std::invalid_argument("trainer: scanChunk must be at least 1");
  slots_ = parameter_slots(config_);
  const ParamSlot& last = slots_.back();
  params_.assign((size_t)(last.offset + (last.count + 15) / 16 * 16), T(0));
  grads_.assign(params_.size(), T(0));
}

template <typename T>
Trainer<T>::~Trainer() = default;

template <typename T>
const ParamSlot* Trainer<T>::slot(const std::string& name) const {
  for (const ParamSlot& s : slots_)
    if (s.name == name) return &s;
  return nullptr;
}

// The elementwise passes over all gradients run on the pool (serial, they were a few percent of a step).
template <typename T>
void Trainer<T>::zero_grads() {
  T* g = grads_.data();
  parallel_for((int64_t)grads_.size(), 1 << 15, [&](int64_t begin, int64_t end) { std::fill(g + begin, g + end, T(0)); });
}

template <typename T>
double Trainer<T>::grad_norm() const {
  // Partial sums over fixed blocks, added in block order: the same result at any thread count.
  constexpr int64_t kBlock = 1 << 15;
  const int64_t n = (int64_t)grads_.size(), blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial((size_t)blocks);
  const T* g = grads_.data();
  parallel_for(blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double s = 0;
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) s += (double)g[i] * (double)g[i];
      partial[(size_t)b] = s;
    }
  });
  double s = 0;
  for (double p : partial) s += p;
  return std::sqrt(s);
}

template <typename T>
void Trainer<T>::scale_grads(double factor) {
  T* g = grads_.data();
  parallel_for((int64_t)grads_.size(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) g[i] = (T)(g[i] * factor);
  });
}

template <typename T>
int64_t Trainer<T>::activation_floats_per_token() const {
  const Config& c = config_;
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size;
  int64_t layer;
  if (c.mamba1()) {
    // resid, rstd, hn, z, conv_in, u, dt_low, B, C, delta, y
    layer = 2 * d + 1 + 5 * di + c.time_step_rank + 2 * N;
  } else {
    const int64_t gn = c.num_groups * N;
    // resid, rstd, hn, z, conv_in, u, B, C, dt, y, yn, rstd_g
    layer = 2 * d + 1 + di + (di + 2 * gn) + di + 2 * gn + c.num_heads + 2 * di + c.num_groups;
  }
  const int64_t moe_layers = (int64_t)c.moe.layers.size();
  // MoE blocks: resid, rstd, hn, and moe.h's MoeSaved (per pair the fc1 output, the weight, the
  // index and two int64 positions; the router scores), in floats.
  const int64_t pairs = c.moe.top_k;
  const int64_t moe_layer = 2 * d + 1 + pairs * (2 * c.moe.hidden + 1 + 1 + 4) + c.moe.experts;
  // Per token beside the layers: the final norm's output and its rstd.
  return c.state_layers() * layer + moe_layers * moe_layer + d + 1;
}

template <typename T>
int64_t Trainer<T>::working_floats_per_token() const {
  const Config& c = config_;
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size;
  const int64_t gn = (c.mamba1() ? 1 : c.num_groups) * N, R = c.time_step_rank;
  // The residual stream, the mixer output, the gradient stream, the head's and the norm's input gradients.
  int64_t floats = 5 * d;
  // dy, du, dz, dB, dC of the layer being differentiated
  floats += 3 * di + 2 * gn;
  // dX accumulated through a temporary: at most [rows, di] (x_proj's input gradient).
  floats += di;
  if (c.mamba1()) {
    // ddelta, packed, tmp
    floats += di + std::max<int64_t>(2 * di, R + 2 * N) + std::max<int64_t>(di, R + 2 * N);
  } else {
    floats += c.in_proj_rows() + c.conv_channels() + c.num_heads;  // packed, tmp, ddt
  }
  if (!c.moe.layers.empty()) {
    // moe_backward's transient per-pair dx rows, the router's logit gradients and the chosen weights'
    // gradients (its per-expert buffers are bounded by the busiest expert's rows, at most every token).
    floats += c.moe.top_k * d + c.moe.experts + c.moe.top_k + 3 * d + 4 * c.moe.hidden;
  }
  return floats;
}

template <typename T>
BatchLoss Trainer<T>::forward_backward(const int32_t* ids, const int32_t* targets, int64_t batch, int64_t length,
                                       bool backward, T loss_scale) {
  const Config& c = config_;
  if (batch < 1 || length < 1) {
    throw std::invalid_argument("trainer: batch and length must be at least 1, got " + std::to_string(batch) + " and " +
                                std::to_string(length));
  }
  const int64_t rows = batch * length;
  for (int64_t i = 0; i < rows; ++i) {
    if (ids[i] < 0 || ids[i] >= c.vocab_size) {
      throw std::out_of_range("trainer: token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    }
    if (targets[i] >= c.vocab_size) {
      throw std::out_of_range("trainer: target " + std::to_string(targets[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");
    }
  }
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, V = c.vocab_size;
  const int64_t H = c.num_heads, P = c.head_dim, G = c.mamba1() ? 1 : c.num_groups, gn = G * N;
  const int64_t R = c.time_step_rank, ch = c.conv_channels(), K = c.conv_kernel;
  const T eps = (T)c.norm_eps;
  auto P_ = [&](const std::string& name) -> T* {
    const ParamSlot* s = slot(name);
    return s ? params_.data() + s->offset : nullptr;
  };
  auto G_ = [&](const std::string& name) -> T* {
    const ParamSlot* s = slot(name);
    return s ? grads_.data() + s->offset : nullptr;
  };
  TrainerWorkspace<T>& w = *ws_;
  std::vector<T>& scratch = w.scratch;

  ScanArgs scan;
  scan.batch = batch;
  scan.length = length;
  scan.channels = di;
  scan.state = N;
  scan.groups = G;
  scan.chunk = scan_chunk_;
  scan.softplus = true;
  SsdTrainArgs ssd;
  ssd.batch = batch;
  ssd.length = length;
  ssd.heads = H;
  ssd.head_dim = P;
  ssd.state = N;
  ssd.groups = G;
  ssd.chunk = scan_chunk_;
  ssd.softplus = true;
  ssd.dt_min = c.time_step_min;
  ssd.dt_max = c.time_step_max;
  MoeShape moe_shape;
  moe_shape.tokens = rows;
  moe_shape.dim = d;
  moe_shape.hidden = c.moe.hidden;
  moe_shape.experts = c.moe.experts;
  moe_shape.top_k = c.moe.top_k;
  moe_shape.scoring = c.moe.scoring;
  moe_shape.renormalize = c.moe.renormalize;
  moe_shape.activation = c.moe.activation;
  // An MoE block's six tensors (MoeParams or MoeParamGrads) from `get` (P_ or G_).
  auto moe_tensors = [](auto& m, auto&& get, const std::string& p) {
    m.router = get(p + "router");
    m.router_bias = get(p + "router_bias");
    m.fc1 = get(p + "fc1");
    m.fc1_bias = get(p + "fc1_bias");
    m.fc2 = get(p + "fc2");
    m.fc2_bias = get(p + "fc2_bias");
  };
  auto moe_params = [&](const std::string& p) {
    MoeParams<T> m;
    moe_tensors(m, P_, p);
    return m;
  };
  double aux_total = 0;

  // A = -exp(A_log): Mamba-1 [di, N], Mamba-2 [H].
  auto layer_A = [&](const std::string& p, Buffer<T>& A) {
    const T* A_log = P_(p + "A_log");
    const int64_t n = c.mamba1() ? di * N : H;
    A.resize((size_t)n);
    for (int64_t i = 0; i < n; ++i) A[i] = -std::exp(A_log[i]);
  };
  // The scan's inputs of a layer (Mamba-1 the selective scan's, Mamba-2 the chunked SSD's).
  auto scan_inputs = [&](const std::string& p, const LayerSaved<T>& s, const Buffer<T>& A) {
    ScanTensors<T> t;
    t.u = s.u.data();
    t.A = A.data();
    t.B = s.Bm.data();
    t.C = s.Cm.data();
    t.delta = s.delta.data();
    t.D = P_(p + "D");
    t.z = s.z.data();
    t.delta_bias = P_(p + "dt_bias");
    return t;
  };
  auto ssd_inputs = [&](const std::string& p, const LayerSaved<T>& s, const Buffer<T>& A) {
    SsdTrainTensors<T> t;
    t.x = s.u.data();
    t.dt = s.delta.data();
    t.A = A.data();
    t.B = s.Bm.data();
    t.C = s.Cm.data();
    t.D = P_(p + "D");
    t.dt_bias = P_(p + "dt_bias");
    return t;
  };

  // ---- Forward ----
  std::vector<LayerSaved<T>>& saved = w.saved;
  saved.resize((size_t)c.num_layers);
  Buffer<T>&resid = w.resid, &h = w.h;
  resid.resize((size_t)(rows * d));
  h.resize((size_t)(rows * d));
  const T* emb = P_("embeddings");
  // resid: the stream entering the layer being run (layer 0: the embeddings, gathered straight into
  // its saved input); each layer's input is formed in place in its saved copy.
  saved[0].resid.resize((size_t)(rows * d));
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      std::memcpy(saved[0].resid.data() + r * d, emb + (int64_t)ids[r] * d, d * sizeof(T));
  });
  Buffer<T>&A = w.A, &tmp = w.tmp;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerSaved<T>& s = saved[(size_t)i];
    if (i > 0) {
      const T* previous = saved[(size_t)i - 1].resid.data();
      s.resid.resize((size_t)(rows * d));
      add(previous, h.data(), s.resid.data(), rows * d);
    }
    s.rstd.resize((size_t)rows);
    s.hn.resize((size_t)(rows * d));
    rmsnorm_forward(s.resid.data(), P_(p + "norm"), s.hn.data(), s.rstd.data(), rows, d, eps);
    if (c.is_moe_layer(i)) {
      double aux = 0;
      moe_forward(moe_shape, moe_params(p), s.hn.data(), h.data(), &s.moe, &aux);
      aux_total += aux;
      continue;
    }
    const T* W_in = P_(p + "in_proj");
    const T* b_in = P_(p + "in_proj_bias");
    auto in_rows = [&](int64_t first, int64_t count, Buffer<T>& out) {
      out.resize((size_t)(rows * count));
      linear(s.hn.data(), W_in + first * d, b_in ? b_in + first : nullptr, out.data(), rows, count, d);
    };
    layer_A(p, A);
    s.y.resize((size_t)(rows * di));
    s.boundary.resize((size_t)(batch * ceil_div(length, scan_chunk_) * di * N));
    if (c.mamba1()) {
      in_rows(0, di, s.conv_in);
      in_rows(di, di, s.z);
      s.u.resize((size_t)(rows * di));
      conv1d_forward(s.conv_in.data(), P_(p + "conv"), P_(p + "conv_bias"), s.u.data(), batch, length, di, K, true);
      tmp.resize((size_t)(rows * (R + 2 * N)));
      linear(s.u.data(), P_(p + "x_proj"), (const T*)nullptr, tmp.data(), rows, R + 2 * N, di);
      s.dt_low.resize((size_t)(rows * R));
      s.Bm.resize((size_t)(rows * N));
      s.Cm.resize((size_t)(rows * N));
      take_columns(tmp.data(), rows, R + 2 * N, 0, R, s.dt_low.data());
      take_columns(tmp.data(), rows, R + 2 * N, R, N, s.Bm.data());
      take_columns(tmp.data(), rows, R + 2 * N, R + N, N, s.Cm.data());
      s.delta.resize((size_t)(rows * di));
      linear(s.dt_low.data(), P_(p + "dt_proj"), (const T*)nullptr, s.delta.data(), rows, di, R);
      scan_forward(scan, scan_inputs(p, s, A), s.y.data(), s.boundary.data());
      linear(s.y.data(), P_(p + "out_proj"), P_(p + "out_proj_bias"), h.data(), rows, d, di);
    } else {
      in_rows(0, di, s.z);
      in_rows(di, ch, s.conv_in);
      in_rows(di + ch, H, s.delta);
      tmp.resize((size_t)(rows * ch));
      conv1d_forward(s.conv_in.data(), P_(p + "conv"), P_(p + "conv_bias"), tmp.data(), batch, length, ch, K, true);
      s.u.resize((size_t)(rows * di));
      s.Bm.resize((size_t)(rows * gn));
      s.Cm.resize((size_t)(rows * gn));
      take_columns(tmp.data(), rows, ch, 0, di, s.u.data());
      take_columns(tmp.data(), rows, ch, di, gn, s.Bm.data());
      take_columns(tmp.data(), rows, ch, di + gn, gn, s.Cm.data());
      ssd_forward(ssd, ssd_inputs(p, s, A), s.y.data(), s.boundary.data());
      s.yn.resize((size_t)(rows * di));
      s.rstd_g.resize((size_t)(rows * G));
      gated_rmsnorm_forward(s.y.data(), s.z.data(), P_(p + "ssm_norm"), s.yn.data(), s.rstd_g.data(), rows, di, di / G,
                            eps, c.norm_before_gate);
      linear(s.yn.data(), P_(p + "out_proj"), P_(p + "out_proj_bias"), h.data(), rows, d, di);
    }
  }
  // residual = h + residual; logits = head · rmsnorm_f(residual), in blocks of rows so that at most
  // kHeadRows × vocab logits exist at once.
  {
    const T* last = saved.back().resid.data();
    add(last, h.data(), resid.data(), rows * d);
  }
  Buffer<T>&rstd_f = w.rstd_f, &hf = w.hf;
  rstd_f.resize((size_t)rows);
  hf.resize((size_t)(rows * d));
  rmsnorm_forward(resid.data(), P_("norm_f"), hf.data(), rstd_f.data(), rows, d, eps);
  const T* head = c.tie_embeddings ? P_("embeddings") : P_("lm_head");
  T* dhead = c.tie_embeddings ? G_("embeddings") : G_("lm_head");
  // Blocks of at least 256 rows and up to 2^20 logits (4 MB): one block for a byte-level model's batch
  // of 4096 tokens, where blocks of 256 rows made 16 rounds of small parallel products.
  const int64_t kHeadRows = std::max<int64_t>(256, ((int64_t)1 << 20) / V);
  Buffer<T>&logits = w.logits, &dhf = w.dhf;
  logits.resize((size_t)(std::min(rows, kHeadRows) * V));
  if (backward) dhf.resize((size_t)(rows * d));
  BatchLoss loss;
  loss.aux = aux_total;
  for (int64_t r0 = 0; r0 < rows; r0 += kHeadRows) {
    const int64_t n = std::min(kHeadRows, rows - r0);
    linear(hf.data() + r0 * d, head, (const T*)nullptr, logits.data(), n, V, d);
    loss.sum += cross_entropy(logits.data(), targets + r0, n, V, loss_scale, &loss.count);
    if (backward) {
      linear_input_grad(logits.data(), head, dhf.data() + r0 * d, n, V, d, false, scratch);
      weight_grad(logits.data(), hf.data() + r0 * d, dhead, (T*)nullptr, n, V, d);
    }
  }
  if (!backward) return loss;

  // ---- Backward ----
  // g: the gradient of the residual stream after the current layer (starting with the final one).
  Buffer<T>& g = w.g;
  g.resize((size_t)(rows * d));
  parallel_for(rows, 64, [&](int64_t begin, int64_t end) { std::fill(g.data() + begin * d, g.data() + end * d, T(0)); });
  rmsnorm_backward(dhf.data(), resid.data(), P_("norm_f"), rstd_f.data(), g.data(), G_("norm_f"), rows, d);
  Buffer<T>&dy = w.dy, &du = w.du, &ddelta = w.ddelta, &dB = w.dB, &dC = w.dC, &dz = w.dz, &dA = w.dA,
                &packed = w.packed, &dhn = w.dhn;
  dhn.resize((size_t)(rows * d));
  for (int64_t i = c.num_layers - 1; i >= 0; --i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    LayerSaved<T>& s = saved[(size_t)i];
    if (c.is_moe_layer(i)) {
      // h = moe(hn): its output gradient is g. The load-balancing term's weight carries
      // loss_scale · count (see trainer.h).
      MoeParamGrads<T> mg;
      moe_tensors(mg, G_, p);
      const T aux_scale = (T)((double)aux_weight_ * (double)loss_scale * (double)loss.count);
      moe_backward(moe_shape, moe_params(p), s.hn.data(), s.moe, g.data(), aux_scale, dhn.data(), mg);
      rmsnorm_backward(dhn.data(), s.resid.data(), P_(p + "norm"), s.rstd.data(), g.data(), G_(p + "norm"), rows, d);
      continue;
    }
    layer_A(p, A);
    const T* W_in = P_(p + "in_proj");
    const T* W_out = P_(p + "out_proj");
    // out = (Mamba-1 y | Mamba-2 yn) · W_outᵀ + b
    const Buffer<T>& out_in = c.mamba1() ? s.y : s.yn;
    weight_grad(g.data(), out_in.data(), G_(p + "out_proj"), G_(p + "out_proj_bias"), rows, d, di);
    // Mamba-1: the scan output's gradient; Mamba-2: the gated norm's output's (in tmp), turned into
    // the scan output's below.
    dy.resize((size_t)(rows * di));
    Buffer<T>& dout_in = c.mamba1() ? dy : tmp;
    dout_in.resize((size_t)(rows * di));
    linear_input_grad(g.data(), W_out, dout_in.data(), rows, d, di, false, scratch);
    du.resize((size_t)(rows * di));
    dB.resize((size_t)(rows * gn));
    dC.resize((size_t)(rows * gn));
    dz.resize((size_t)(rows * di));
    dA.assign(A.size(), T(0));
    T* dA_log = G_(p + "A_log");
    if (c.mamba1()) {
      ddelta.resize((size_t)(rows * di));
      ScanGrads<T> sg;
      sg.du = du.data();
      sg.ddelta = ddelta.data();
      sg.dA = dA.data();
      sg.dB = dB.data();
      sg.dC = dC.data();
      sg.dD = G_(p + "D");
      sg.dz = dz.data();
      sg.ddelta_bias = G_(p + "dt_bias");
      scan_backward(scan, scan_inputs(p, s, A), s.boundary.data(), dy.data(), sg);
      for (int64_t j = 0; j < di * N; ++j) dA_log[j] += dA[j] * A[j];
      // delta = dt_low · W_dtᵀ
      weight_grad(ddelta.data(), s.dt_low.data(), G_(p + "dt_proj"), (T*)nullptr, rows, di, R);
      tmp.resize((size_t)(rows * R));
      linear_input_grad(ddelta.data(), P_(p + "dt_proj"), tmp.data(), rows, di, R, false, scratch);
      // [dt_low, B, C] = u · W_xᵀ
      packed.resize((size_t)(rows * (R + 2 * N)));
      put_columns(tmp.data(), rows, R + 2 * N, 0, R, packed.data());
      put_columns(dB.data(), rows, R + 2 * N, R, N, packed.data());
      put_columns(dC.data(), rows, R + 2 * N, R + N, N, packed.data());
      weight_grad(packed.data(), s.u.data(), G_(p + "x_proj"), (T*)nullptr, rows, R + 2 * N, di);
      linear_input_grad(packed.data(), P_(p + "x_proj"), du.data(), rows, R + 2 * N, di, true, scratch);
      // u = silu(conv(x) + b)
      tmp.resize((size_t)(rows * di));
      conv1d_backward(du.data(), s.conv_in.data(), P_(p + "conv"), P_(p + "conv_bias"), tmp.data(), G_(p + "conv"),
                      G_(p + "conv_bias"), batch, length, di, K, true);
      // [x, z] = hn · W_inᵀ + b
      packed.resize((size_t)(rows * 2 * di));
      put_columns(tmp.data(), rows, 2 * di, 0, di, packed.data());
      put_columns(dz.data(), rows, 2 * di, di, di, packed.data());
    } else {
      // yn = gated_norm(y, z) · w
      gated_rmsnorm_backward(tmp.data(), s.y.data(), s.z.data(), P_(p + "ssm_norm"), s.rstd_g.data(), dy.data(),
                             dz.data(), G_(p + "ssm_norm"), rows, di, di / G, c.norm_before_gate);
      Buffer<T>& ddt = w.ddt;
      ddt.resize((size_t)(rows * H));
      SsdTrainGrads<T> sg;
      sg.dx = du.data();
      sg.ddt = ddt.data();
      sg.dA = dA.data();
      sg.dB = dB.data();
      sg.dC = dC.data();
      sg.dD = G_(p + "D");
      sg.ddt_bias = G_(p + "dt_bias");
      ssd_backward(ssd, ssd_inputs(p, s, A), s.boundary.data(), dy.data(), sg);
      for (int64_t hh = 0; hh < H; ++hh) dA_log[hh] += dA[hh] * A[hh];
      // xBC = silu(conv(xBC_in) + b), split into x, B, C
      packed.resize((size_t)(rows * ch));
      put_columns(du.data(), rows, ch, 0, di, packed.data());
      put_columns(dB.data(), rows, ch, di, gn, packed.data());
      put_columns(dC.data(), rows, ch, di + gn, gn, packed.data());
      tmp.resize((size_t)(rows * ch));
      conv1d_backward(packed.data(), s.conv_in.data(), P_(p + "conv"), P_(p + "conv_bias"), tmp.data(),
                      G_(p + "conv"), G_(p + "conv_bias"), batch, length, ch, K, true);
      // [z, xBC_in, dt] = hn · W_inᵀ + b
      const int64_t width = di + ch + H;
      packed.resize((size_t)(rows * width));
      put_columns(dz.data(), rows, width, 0, di, packed.data());
      put_columns(tmp.data(), rows, width, di, ch, packed.data());
      put_columns(ddt.data(), rows, width, di + ch, H, packed.data());
    }
    const int64_t width = c.in_proj_rows();
    weight_grad(packed.data(), s.hn.data(), G_(p + "in_proj"), G_(p + "in_proj_bias"), rows, width, d);
    linear_input_grad(packed.data(), W_in, dhn.data(), rows, width, d, false, scratch);
    // hn = rmsnorm(resid)·w; the residual passes g through unchanged and adds the norm's gradient.
    rmsnorm_backward(dhn.data(), s.resid.data(), P_(p + "norm"), s.rstd.data(), g.data(), G_(p + "norm"), rows, d);
  }
  // The embedding rows' gradients, tokens in order; threads own column ranges (deterministic).
  T* demb = G_("embeddings");
  parallel_for(d, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = demb + (int64_t)ids[r] * d;
      const T* src = g.data() + r * d;
      for (int64_t j = c0; j < c1; ++j) dst[j] += src[j];
    }
  });
  return loss;
}

template class Trainer<float>;
template class Trainer<double>;

void adamw_update(float* params, const float* grads, float* m, float* v, const std::vector<ParamSlot>& slots,
                  const AdamWParams& a) {
  if (a.step < 1) throw std::invalid_argument("adamw: step counts from 1");
  const double c1 = 1.0 - std::pow(a.beta1, (double)a.step), c2 = 1.0 - std::pow(a.beta2, (double)a.step);
  const float lr = (float)a.lr, b1 = (float)a.beta1, b2 = (float)a.beta2, eps = (float)a.eps;
  const float step_size = (float)(a.lr / c1), inv_sqrt_c2 = (float)(1.0 / std::sqrt(c2));
  for (const ParamSlot& s : slots) {
    const float shrink = s.decay ? 1.0f - lr * (float)a.weight_decay : 1.0f;
    parallel_for(s.count, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = s.offset + begin; j < s.offset + end; ++j) {
        const float gj = grads[j];
        m[j] = b1 * m[j] + (1.0f - b1) * gj;
        v[j] = b2 * v[j] + (1.0f - b2) * gj * gj;
        params[j] = params[j] * shrink - step_size * m[j] / (std::sqrt(v[j]) * inv_sqrt_c2 + eps);
      }
    });
  }
}

double optimizer_step(Trainer<float>& t, float* m, float* v, AdamWParams hyper, double max_norm, int64_t* step) {
  const double norm = t.grad_norm();
  if (!std::isfinite(norm)) {
    t.zero_grads();
    throw std::runtime_error("the gradient is not finite (norm " + std::to_string(norm) +
                             "); the step was skipped — a lower learning rate may help");
  }
  if (max_norm > 0 && norm > max_norm) t.scale_grads(max_norm / (norm + 1e-6));
  hyper.step = ++*step;
  adamw_update(t.params(), t.grads(), m, v, t.slots(), hyper);
  t.zero_grads();
  return norm;
}

}  // namespace mssm::train
