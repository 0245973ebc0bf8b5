// The model runner (see mamba_model.h for the equations, the glossary and the state layout).
//
// Prefill runs one sequence at a time as a batch-1 pass of L rows, so every projection is a GEMM and
// the scans are the chunked / sequential kernels; a long sequence is cut into segments with the states
// carried from one to the next. Decode runs B sequences of one token each: every projection is one
// matmul with M = B (the weights are read once for the batch) and the scans are the one-step kernels.
// A step's products go through matmul_step, whose q8_0 products round the activations at the
// avx512bf16 level (to int8 for a few sequences, to bf16 with the weights for many; kernels.h); a
// prefill's never do.
#include "mamba_model.h"

#include <algorithm>
#include <cstring>

#include "../core/large_alloc.h"
#include "../cpu/kernels.h"

namespace mssm::model {

namespace {

using cpu::kernels;

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// The rows [first, first + count) of a row-major matrix of `cols` columns: a matrix of its own, since
// each row (a q8_0 row too: cols / 32 blocks) is stored whole.
const void* matrix_rows(const Weight& w, int64_t first) {
  return static_cast<const uint8_t*>(w.data) + dtype_bytes(w.dtype, first * w.shape[1]);
}

const float* f32(const Weight& w) { return static_cast<const float*>(w.data); }
const float* f32_or_null(const Weight& w) { return w.data ? static_cast<const float*>(w.data) : nullptr; }
const float* offset_or_null(const Weight& w, int64_t first) {
  return w.data ? static_cast<const float*>(w.data) + first : nullptr;
}

// Copies columns [first, first + count) of each of `rows` rows of width `width` into a packed buffer.
void copy_columns(const float* src, int64_t rows, int64_t width, int64_t first, int64_t count, float* dst) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * count, src + r * width + first, count * sizeof(float));
}

constexpr int64_t kDefaultSegment = 512;
// SSD's result does not depend on its chunk size; on CPU, chunks of 64 tokens measured fastest at the
// 130M shape (L 512, H 24, P 64, N 128: 1.72 ms against 2.28 ms at the checkpoints' 256).
constexpr int64_t kCpuSsdChunk = 64;
int64_t cpu_ssd_chunk(const Config& c) { return std::min(c.chunk_size, kCpuSsdChunk); }

}  // namespace

// Scratch for `rows` rows (tokens of one segment in prefill, sequences in decode), in one block.
struct Workspace {
  int64_t rows = 0;
  LargeBuffer storage;
  // Residual stream, mixer output and normalised input [rows, d].
  float *residual = nullptr, *hidden = nullptr, *normed = nullptr;
  // Mamba-1: x, z, conv output xc, delta, y [rows, di]; dbc [rows, R + 2N]; dt_low [rows, R]; B, C [rows, N].
  // Mamba-2: z, y, gated-norm output yn [rows, di]; xbc and conv output xc [rows, conv channels: x,
  //          B, C side by side]; dt [rows, H].
  float *x = nullptr, *z = nullptr, *xc = nullptr, *delta = nullptr, *y = nullptr, *yn = nullptr;
  float *dbc = nullptr, *dt_low = nullptr, *B = nullptr, *C = nullptr, *xbc = nullptr, *dt = nullptr;
  // Decode: the whole in_proj product [rows, in_proj rows], split afterwards (one product instead of
  // two or three small ones, each of which would wake the thread pool).
  float* proj = nullptr;
  // MoE blocks: router logits [rows, E] and the routing (weights, indices [rows, k]).
  float *router_logits = nullptr, *route_weights = nullptr;
  std::vector<int32_t> route_indices;
  // States of one sequence when the caller keeps none: [layers][conv] and [layers][ssm].
  std::vector<float> conv_state, ssm_state;

  void allocate(const Config& c, int64_t n_rows) {
    const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size;
    struct Slot {
      float** target;
      int64_t per_row;
    };
    const int64_t in_proj_rows = c.mamba1() ? 2 * di : di + c.conv_channels() + c.num_heads;
    std::vector<Slot> slots = {{&residual, d}, {&hidden, d}, {&normed, d},
                               {&z, di},        {&y, di},      {&proj, in_proj_rows}};
    if (c.mamba1()) {
      const int64_t R = c.time_step_rank;
      slots.insert(slots.end(),
                   {{&x, di}, {&xc, di}, {&delta, di}, {&dbc, R + 2 * N}, {&dt_low, R}, {&B, N}, {&C, N}});
    } else {  // the SSD reads x, B and C inside xc
      slots.insert(slots.end(), {{&yn, di}, {&xbc, c.conv_channels()}, {&xc, c.conv_channels()}, {&dt, c.num_heads}});
    }
    if (!c.moe.layers.empty()) {
      slots.insert(slots.end(), {{&router_logits, c.moe.experts}, {&route_weights, c.moe.top_k}});
      route_indices.resize((size_t)(n_rows * c.moe.top_k));
    }
    // Each buffer starts on a 64-byte boundary (16 floats) so no two share a cache line.
    int64_t total = 0;
    for (const Slot& s : slots) total += (s.per_row * n_rows + 15) / 16 * 16;
    storage = LargeBuffer((size_t)total * sizeof(float));  // 64-byte aligned
    float* base = static_cast<float*>(storage.data());
    for (const Slot& s : slots) {
      *s.target = base;
      base += (s.per_row * n_rows + 15) / 16 * 16;
    }
    rows = n_rows;
  }
};

void validate_config(const Config& c) {
  auto positive = [](int64_t v, const char* name) {
    if (v < 1 || v > ((int64_t)1 << 40)) {
      throw std::invalid_argument(std::string("model config: ") + name + " must be a positive integer, got " +
                                  std::to_string(v));
    }
  };
  if (c.architecture != Architecture::mamba1 && c.architecture != Architecture::mamba2) {
    throw std::invalid_argument("model config: architecture must be mamba1 or mamba2");
  }
  positive(c.hidden_size, "hiddenSize");
  positive(c.num_layers, "numLayers");
  positive(c.vocab_size, "vocabSize");
  if (c.vocab_size > INT32_MAX) throw std::invalid_argument("model config: vocabSize must fit in int32");
  positive(c.intermediate_size, "intermediateSize");
  positive(c.state_size, "stateSize");
  positive(c.conv_kernel, "convKernel");
  if (c.conv_kernel > 1024) throw std::invalid_argument("model config: convKernel must be at most 1024");
  if (!(c.norm_eps >= 0)) throw std::invalid_argument("model config: normEps must be >= 0");
  if (c.mamba1()) {
    positive(c.time_step_rank, "timeStepRank");
  } else {
    positive(c.num_heads, "numHeads");
    positive(c.head_dim, "headDim");
    positive(c.num_groups, "numGroups");
    positive(c.chunk_size, "chunkSize");
    if (c.num_heads * c.head_dim != c.intermediate_size) {
      throw std::invalid_argument("model config: numHeads · headDim (" + std::to_string(c.num_heads) + " · " +
                                  std::to_string(c.head_dim) + ") must equal intermediateSize " +
                                  std::to_string(c.intermediate_size));
    }
    if (c.num_heads % c.num_groups != 0) {
      throw std::invalid_argument("model config: numHeads " + std::to_string(c.num_heads) +
                                  " must be a multiple of numGroups " + std::to_string(c.num_groups));
    }
    if (!(c.time_step_min <= c.time_step_max)) {
      throw std::invalid_argument("model config: timeStepLimit must be [min, max] with min <= max");
    }
  }
  const MoeConfig& m = c.moe;
  if (!m.layers.empty()) {
    for (size_t j = 0; j < m.layers.size(); ++j) {
      const int64_t i = m.layers[j];
      if (i < 0 || i >= c.num_layers) {
        throw std::invalid_argument("model config: moe.layers holds " + std::to_string(i) +
                                    ", outside the layers [0, " + std::to_string(c.num_layers) + ")");
      }
      if (j > 0 && i <= m.layers[j - 1]) {
        throw std::invalid_argument("model config: moe.layers must be strictly increasing");
      }
    }
    if (c.state_layers() < 1) {
      throw std::invalid_argument("model config: moe.layers lists every layer; at least one must be a Mamba layer");
    }
    positive(m.experts, "moe.numExperts");
    positive(m.hidden, "moe.hiddenSize");
    positive(m.top_k, "moe.topK");
    if (m.top_k > m.experts) {
      throw std::invalid_argument("model config: moe.topK " + std::to_string(m.top_k) + " exceeds moe.numExperts " +
                                  std::to_string(m.experts));
    }
    if (m.scoring != cpu::MoeScoring::softmax && m.scoring != cpu::MoeScoring::sigmoid) {
      throw std::invalid_argument("model config: moe.scoring must be softmax or sigmoid");
    }
    if (m.activation != cpu::Activation::silu && m.activation != cpu::Activation::gelu &&
        m.activation != cpu::Activation::gelu_tanh) {
      throw std::invalid_argument("model config: moe.activation must be silu, gelu or gelu_tanh");
    }
  }
}

bool Config::is_moe_layer(int64_t i) const { return std::binary_search(moe.layers.begin(), moe.layers.end(), i); }

int64_t Config::state_index(int64_t i) const {
  return i - (int64_t)(std::lower_bound(moe.layers.begin(), moe.layers.end(), i) - moe.layers.begin());
}

std::vector<WeightSpec> expected_weights(const Config& c) {
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size;
  std::vector<WeightSpec> out;
  out.push_back({"embeddings", {c.vocab_size, d}, true});
  out.push_back({"norm_f", {d}, false});
  if (!c.tie_embeddings) out.push_back({"lm_head", {c.vocab_size, d}, true});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    out.push_back({p + "norm", {d}, false});
    if (c.is_moe_layer(i)) {
      const int64_t E = c.moe.experts, Hm = c.moe.hidden;
      out.push_back({p + "router", {E, d}, true});
      if (c.moe.bias) out.push_back({p + "router_bias", {E}, false});
      out.push_back({p + "fc1", {E, 2 * Hm, d}, true});
      if (c.moe.bias) out.push_back({p + "fc1_bias", {E, 2 * Hm}, false});
      out.push_back({p + "fc2", {E, d, Hm}, true});
      if (c.moe.bias) out.push_back({p + "fc2_bias", {E, d}, false});
      continue;
    }
    out.push_back({p + "in_proj", {c.in_proj_rows(), d}, true});
    if (c.use_bias) {
      out.push_back({p + "in_proj_bias", {c.in_proj_rows()}, false});
      out.push_back({p + "out_proj_bias", {d}, false});
    }
    out.push_back({p + "conv", {c.conv_channels(), c.conv_kernel}, false});
    if (c.use_conv_bias) out.push_back({p + "conv_bias", {c.conv_channels()}, false});
    if (c.mamba1()) {
      out.push_back({p + "x_proj", {c.time_step_rank + 2 * N, di}, true});
      out.push_back({p + "dt_proj", {di, c.time_step_rank}, true});
      out.push_back({p + "dt_bias", {di}, false});
      out.push_back({p + "A", {di, N}, false});
      out.push_back({p + "D", {di}, false});
    } else {
      out.push_back({p + "dt_bias", {c.num_heads}, false});
      out.push_back({p + "A", {c.num_heads}, false});
      out.push_back({p + "D", {c.num_heads}, false});
      out.push_back({p + "ssm_norm", {di}, false});
    }
    out.push_back({p + "out_proj", {d, di}, true});
  }
  return out;
}

Model::Model(const Config& config, const std::unordered_map<std::string, Weight>& weights) : config_(config) {
  validate_config(config_);
  std::unordered_map<std::string, Weight> checked;
  for (const WeightSpec& spec : expected_weights(config_)) {
    auto it = weights.find(spec.name);
    if (it == weights.end()) {
      throw std::invalid_argument("missing weight \"" + spec.name + "\" (shape " + shape_string(spec.shape) + ")");
    }
    const Weight& w = it->second;
    const std::string what = "weight \"" + spec.name + "\"";
    if (w.shape != spec.shape) {
      throw std::invalid_argument(what + ": expected shape " + shape_string(spec.shape) + ", got " +
                                  shape_string(w.shape));
    }
    if (spec.matrix) {
      if (w.dtype != DType::f32 && w.dtype != DType::f16 && w.dtype != DType::bf16 && w.dtype != DType::q8_0) {
        throw std::invalid_argument(what + ": expected f32, f16, bf16 or q8_0, got " + dtype_name(w.dtype));
      }
      if (w.dtype == DType::q8_0 && spec.shape.back() % kQ8BlockSize != 0) {
        throw std::invalid_argument(what + ": q8_0 rows hold whole blocks of 32 values, but a row has " +
                                    std::to_string(spec.shape.back()) + "; store it as f32, f16 or bf16");
      }
    } else if (w.dtype != DType::f32) {
      throw std::invalid_argument(what + ": expected f32 (only matrices may be f16, bf16 or q8_0), got " +
                                  dtype_name(w.dtype));
    }
    const int64_t need = dtype_bytes(w.dtype, element_count(spec.shape));
    if (w.bytes < need) {
      throw std::invalid_argument(what + ": " + dtype_name(w.dtype) + " " + shape_string(spec.shape) + " needs " +
                                  std::to_string(need) + " bytes, got " + std::to_string(w.bytes));
    }
    if (!w.data && need > 0) throw std::invalid_argument(what + ": no data");
    checked.emplace(spec.name, w);
  }
  for (const auto& entry : weights) {
    if (!checked.count(entry.first)) {
      throw std::invalid_argument("unexpected weight \"" + entry.first + "\": not a canonical weight of this " +
                                  (config_.mamba1() ? "mamba1" : "mamba2") + " configuration" +
                                  (entry.first == "lm_head" ? " (tieEmbeddings is true)" : ""));
    }
  }
  embeddings_ = checked.at("embeddings");
  norm_f_ = checked.at("norm_f");
  lm_head_ = config_.tie_embeddings ? embeddings_ : checked.at("lm_head");
  layers_.resize(config_.num_layers);
  for (int64_t i = 0; i < config_.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    auto get = [&](const char* name) {
      auto it = checked.find(p + name);
      return it == checked.end() ? Weight{} : it->second;
    };
    LayerWeights& l = layers_[i];
    l.norm = get("norm");
    l.in_proj = get("in_proj");
    l.in_proj_bias = get("in_proj_bias");
    l.conv = get("conv");
    l.conv_bias = get("conv_bias");
    l.x_proj = get("x_proj");
    l.dt_proj = get("dt_proj");
    l.dt_bias = get("dt_bias");
    l.A = get("A");
    l.D = get("D");
    l.ssm_norm = get("ssm_norm");
    l.out_proj = get("out_proj");
    l.out_proj_bias = get("out_proj_bias");
    l.router = get("router");
    l.router_bias = get("router_bias");
    l.fc1 = get("fc1");
    l.fc1_bias = get("fc1_bias");
    l.fc2 = get("fc2");
    l.fc2_bias = get("fc2_bias");
  }
}

Model::~Model() = default;

std::unique_ptr<Workspace> Model::acquire(int64_t rows) const {
  std::unique_ptr<Workspace> ws;
  {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (!cache_.empty()) {
      ws = std::move(cache_.back());
      cache_.pop_back();
    }
  }
  if (!ws) ws.reset(new Workspace());
  if (ws->rows < rows) ws->allocate(config_, rows);
  return ws;
}

void Model::release(std::unique_ptr<Workspace> ws) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  // Keep at most two: a decode loop and one prefill beside it.
  if (cache_.size() < 2) cache_.push_back(std::move(ws));
}

void Model::check_ids(const int32_t* ids, int64_t count) const {
  for (int64_t i = 0; i < count; ++i) {
    if (ids[i] < 0 || ids[i] >= config_.vocab_size) {
      throw std::out_of_range("token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                              " is outside the vocabulary [0, " + std::to_string(config_.vocab_size) + ")");
    }
  }
}

void Model::mixer_mamba1(Workspace& ws, const LayerWeights& w, int64_t rows, bool decode, const float* conv_in,
                         float* conv_out, const float* ssm_in, float* ssm_out) const {
  const auto& k = kernels();
  const Config& c = config_;
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, R = c.time_step_rank;
  const auto matmul = decode ? k.matmul_step : k.matmul;  // (a step's q8_0 products round x: see the top)
  // xz = hn·W_inᵀ (+b). Prefill: the x rows and the z rows of W_in as two products, so x and z land
  // packed. Decode: one product; with one row its x and z halves are already packed.
  const float* x = ws.x;
  const float* z = ws.z;
  if (decode) {
    matmul(ws.normed, w.in_proj.data, w.in_proj.dtype, f32_or_null(w.in_proj_bias), ws.proj, rows, 2 * di, d);
    if (rows == 1) {
      x = ws.proj;
      z = ws.proj + di;
    } else {
      copy_columns(ws.proj, rows, 2 * di, 0, di, ws.x);
      copy_columns(ws.proj, rows, 2 * di, di, di, ws.z);
    }
  } else {
    k.matmul(ws.normed, matrix_rows(w.in_proj, 0), w.in_proj.dtype, offset_or_null(w.in_proj_bias, 0), ws.x, rows,
             di, d);
    k.matmul(ws.normed, matrix_rows(w.in_proj, di), w.in_proj.dtype, offset_or_null(w.in_proj_bias, di), ws.z, rows,
             di, d);
  }
  // x = silu(conv1d(x) + b_conv)
  if (decode) {
    k.conv1d_step(x, f32(w.conv), f32_or_null(w.conv_bias), conv_out, ws.xc, rows, di, c.conv_kernel, true);
  } else {
    k.conv1d(x, f32(w.conv), f32_or_null(w.conv_bias), conv_in, conv_out, ws.xc, 1, rows, di, c.conv_kernel, true);
  }
  // dt_low, B, C = split(x·W_xᵀ, [R, N, N]);  delta = dt_low·W_dtᵀ (its bias is the scan's delta_bias)
  matmul(ws.xc, w.x_proj.data, w.x_proj.dtype, nullptr, ws.dbc, rows, R + 2 * N, di);
  copy_columns(ws.dbc, rows, R + 2 * N, 0, R, ws.dt_low);
  copy_columns(ws.dbc, rows, R + 2 * N, R, N, ws.B);
  copy_columns(ws.dbc, rows, R + 2 * N, R + N, N, ws.C);
  matmul(ws.dt_low, w.dt_proj.data, w.dt_proj.dtype, nullptr, ws.delta, rows, di, R);
  cpu::SelectiveScanArgs s;
  s.batch = decode ? rows : 1;
  s.length = decode ? 1 : rows;
  s.channels = di;
  s.state = N;
  s.groups = 1;
  s.u = ws.xc;
  s.delta = ws.delta;
  s.A = f32(w.A);
  s.B = ws.B;
  s.C = ws.C;
  s.D = f32(w.D);
  s.z = z;
  s.delta_bias = f32(w.dt_bias);
  s.delta_softplus = true;
  s.state_in = ssm_in;
  s.state_out = ssm_out;
  s.y = ws.y;
  if (decode) {
    k.selective_state_update(s);
  } else {
    k.selective_scan(s);
  }
  matmul(ws.y, w.out_proj.data, w.out_proj.dtype, f32_or_null(w.out_proj_bias), ws.hidden, rows, d, di);
}

void Model::mixer_mamba2(Workspace& ws, const LayerWeights& w, int64_t rows, bool decode, const float* conv_in,
                         float* conv_out, const float* ssm_in, float* ssm_out) const {
  const auto& k = kernels();
  const Config& c = config_;
  const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, H = c.num_heads;
  const int64_t gn = c.num_groups * N, channels = c.conv_channels();
  const auto matmul = decode ? k.matmul_step : k.matmul;  // (a step's q8_0 products round x: see the top)
  // zxbcdt = hn·W_inᵀ (+b). Prefill: the z, xBC and dt row blocks of W_in as three products, so each
  // lands packed. Decode: one product; with one row its parts are already packed.
  const float* z = ws.z;
  const float* xbc = ws.xbc;
  const float* dt = ws.dt;
  if (decode) {
    const int64_t width = di + channels + H;
    matmul(ws.normed, w.in_proj.data, w.in_proj.dtype, f32_or_null(w.in_proj_bias), ws.proj, rows, width, d);
    if (rows == 1) {
      z = ws.proj;
      xbc = ws.proj + di;
      dt = ws.proj + di + channels;
    } else {
      copy_columns(ws.proj, rows, width, 0, di, ws.z);
      copy_columns(ws.proj, rows, width, di, channels, ws.xbc);
      copy_columns(ws.proj, rows, width, di + channels, H, ws.dt);
    }
  } else {
    k.matmul(ws.normed, matrix_rows(w.in_proj, 0), w.in_proj.dtype, offset_or_null(w.in_proj_bias, 0), ws.z, rows,
             di, d);
    k.matmul(ws.normed, matrix_rows(w.in_proj, di), w.in_proj.dtype, offset_or_null(w.in_proj_bias, di), ws.xbc,
             rows, channels, d);
    k.matmul(ws.normed, matrix_rows(w.in_proj, di + channels), w.in_proj.dtype,
             offset_or_null(w.in_proj_bias, di + channels), ws.dt, rows, H, d);
  }
  // xBC = silu(conv1d(xBC) + b_conv);  x [H, P], B [G, N], C [G, N]
  if (decode) {
    k.conv1d_step(xbc, f32(w.conv), f32_or_null(w.conv_bias), conv_out, ws.xc, rows, channels, c.conv_kernel,
                  true);
  } else {
    k.conv1d(xbc, f32(w.conv), f32_or_null(w.conv_bias), conv_in, conv_out, ws.xc, 1, rows, channels,
             c.conv_kernel, true);
  }
  // x, B and C are read in place from each row of xBC.
  cpu::SsdArgs s;
  s.batch = decode ? rows : 1;
  s.length = decode ? 1 : rows;
  s.heads = H;
  s.head_dim = c.head_dim;
  s.state = N;
  s.groups = c.num_groups;
  s.chunk_size = cpu_ssd_chunk(c);
  // bf16 weights: the chunk products in bf16 too, as the prefill GEMMs around them.
  s.bf16_products = w.in_proj.dtype == DType::bf16;
  s.x = ws.xc;
  s.B = ws.xc + di;
  s.C = ws.xc + di + gn;
  s.x_stride = s.bc_stride = channels;
  s.dt = dt;
  s.A = f32(w.A);
  s.D = f32(w.D);
  s.z = nullptr;  // the gate is applied by the gated norm below
  s.dt_bias = f32(w.dt_bias);
  s.dt_softplus = true;
  s.dt_min = c.time_step_min;
  s.dt_max = c.time_step_max;
  s.state_in = ssm_in;
  s.state_out = ssm_out;
  s.y = ws.y;
  if (decode) {
    k.ssd_step(s);
  } else {
    k.ssd_chunked(s);
  }
  // y = rmsnorm_grouped(y ⊙ silu(z)) · w over groups of di / G (norm_before_gate false)
  k.gated_rmsnorm(ws.y, z, f32(w.ssm_norm), ws.yn, rows, di, di / c.num_groups, c.norm_eps, c.norm_before_gate);
  matmul(ws.yn, w.out_proj.data, w.out_proj.dtype, f32_or_null(w.out_proj_bias), ws.hidden, rows, d, di);
}

void Model::moe_block(Workspace& ws, const LayerWeights& w, int64_t rows) const {
  const auto& k = kernels();
  const Config& c = config_;
  const MoeConfig& m = c.moe;
  const int64_t d = c.hidden_size;
  // logits = hn·routerᵀ (+b) → top-k weights → Σ_k weight · expert_k(hn)
  k.matmul(ws.normed, w.router.data, w.router.dtype, f32_or_null(w.router_bias), ws.router_logits, rows, m.experts,
           d);
  // (No tokens-per-expert counts: moe_experts groups the pairs itself.)
  k.moe_route(ws.router_logits, rows, m.experts, m.top_k, m.scoring, m.renormalize, ws.route_weights,
              ws.route_indices.data(), nullptr);
  cpu::MoeExpertsArgs e = c.moe_experts_args(rows, ws.normed, ws.route_indices.data(), ws.route_weights, ws.hidden);
  e.fc1 = w.fc1.data, e.fc1_dtype = w.fc1.dtype, e.fc1_bias = f32_or_null(w.fc1_bias);
  e.fc2 = w.fc2.data, e.fc2_dtype = w.fc2.dtype, e.fc2_bias = f32_or_null(w.fc2_bias);
  k.moe_experts(e);
}

void Model::run_layers(Workspace& ws, int64_t rows, bool decode, bool read_state, StateView conv_state,
                       StateView ssm_state) const {
  const auto& k = kernels();
  const Config& c = config_;
  const int64_t d = c.hidden_size;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const LayerWeights& w = layers_[i];
    // residual = h + residual (layer 0: the embedding itself, already in ws.residual); hn = rmsnorm(residual)
    if (i == 0) {
      k.rmsnorm(ws.residual, nullptr, f32(w.norm), ws.normed, nullptr, rows, d, c.norm_eps);
    } else {
      k.rmsnorm(ws.hidden, ws.residual, f32(w.norm), ws.normed, ws.residual, rows, d, c.norm_eps);
    }
    if (c.is_moe_layer(i)) {
      moe_block(ws, w, rows);
      continue;
    }
    const int64_t state = c.state_index(i);
    float* conv = conv_state.layer(state, c.conv_state_floats());
    float* ssm = ssm_state.layer(state, c.ssm_state_floats());
    const float* conv_in = read_state ? conv : nullptr;
    const float* ssm_in = read_state ? ssm : nullptr;
    if (c.mamba1()) {
      mixer_mamba1(ws, w, rows, decode, conv_in, conv, ssm_in, ssm);
    } else {
      mixer_mamba2(ws, w, rows, decode, conv_in, conv, ssm_in, ssm);
    }
  }
}

void Model::forward(const ForwardArgs& a) const {
  const Config& c = config_;
  if (a.sequences < 1) throw std::invalid_argument("forward: at least one sequence is needed");
  if (!a.ids || !a.lengths || !a.logits) throw std::invalid_argument("forward: ids, lengths and logits are required");
  if (a.use_initial_state && (!a.conv_state || !a.ssm_state)) {
    throw std::invalid_argument("forward: useInitialState needs both convState and ssmState");
  }
  int64_t total = 0, longest = 0;
  for (int64_t s = 0; s < a.sequences; ++s) {
    if (a.lengths[s] < 1) {
      throw std::invalid_argument("forward: sequence " + std::to_string(s) + " has length " +
                                  std::to_string(a.lengths[s]) + "; every sequence needs at least one token");
    }
    total += a.lengths[s];
    longest = std::max(longest, a.lengths[s]);
  }
  if (a.padded_length > 0 && longest > a.padded_length) {
    throw std::invalid_argument("forward: a sequence of " + std::to_string(longest) +
                                " tokens does not fit logits padded to " + std::to_string(a.padded_length));
  }
  check_ids(a.ids, total);

  int64_t segment = a.segment_tokens;
  if (segment <= 0) {
    // Whole SSD chunks per segment, so a long sequence is chunked as it would be in one pass.
    const int64_t chunk = cpu_ssd_chunk(c);
    segment = c.mamba1() ? kDefaultSegment : std::max(chunk, kDefaultSegment / chunk * chunk);
  }
  const int64_t rows_max = std::min(segment, longest);
  std::unique_ptr<Workspace> ws = acquire(rows_max);
  const bool own_conv = !a.conv_state, own_ssm = !a.ssm_state;
  if (own_conv) ws->conv_state.resize(c.state_layers() * c.conv_state_floats());
  if (own_ssm) ws->ssm_state.resize(c.state_layers() * c.ssm_state_floats());
  const auto& k = kernels();
  const int64_t d = c.hidden_size, vocab = c.vocab_size;

  int64_t start = 0;
  for (int64_t s = 0; s < a.sequences; ++s) {
    const int64_t length = a.lengths[s];
    // The caller's states hold every sequence (batch = sequences); our own hold one.
    float* conv = own_conv ? ws->conv_state.data() : a.conv_state;
    float* ssm = own_ssm ? ws->ssm_state.data() : a.ssm_state;
    const int64_t conv_batch = own_conv ? 1 : a.sequences, conv_index = own_conv ? 0 : s;
    const int64_t ssm_batch = own_ssm ? 1 : a.sequences, ssm_index = own_ssm ? 0 : s;
    for (int64_t offset = 0; offset < length; offset += segment) {
      const int64_t rows = std::min(segment, length - offset);
      const bool read_state = offset > 0 || a.use_initial_state;
      k.embedding(embeddings_.data, embeddings_.dtype, a.ids + start + offset, ws->residual, rows, d);
      run_layers(*ws, rows, false, read_state, {conv, conv_batch, conv_index}, {ssm, ssm_batch, ssm_index});
      // residual = h + residual;  logits = lm_head · rmsnorm_f(residual)
      const bool last_segment = offset + rows == length;
      if (a.last_only) {
        if (last_segment) {
          const int64_t r = rows - 1;
          k.rmsnorm(ws->hidden + r * d, ws->residual + r * d, f32(norm_f_), ws->normed, nullptr, 1, d, c.norm_eps);
          k.matmul(ws->normed, lm_head_.data, lm_head_.dtype, nullptr, a.logits + s * vocab, 1, vocab, d);
        }
      } else {
        k.rmsnorm(ws->hidden, ws->residual, f32(norm_f_), ws->normed, nullptr, rows, d, c.norm_eps);
        const int64_t first_row = (a.padded_length > 0 ? s * a.padded_length : start) + offset;
        k.matmul(ws->normed, lm_head_.data, lm_head_.dtype, nullptr, a.logits + first_row * vocab, rows, vocab, d);
      }
    }
    start += length;
  }
  release(std::move(ws));
}

void Model::step(const StepArgs& a) const {
  const Config& c = config_;
  if (a.batch < 1) throw std::invalid_argument("step: batch must be at least 1");
  if (!a.ids || !a.conv_state || !a.ssm_state || !a.logits) {
    throw std::invalid_argument("step: ids, convState, ssmState and logits are required");
  }
  check_ids(a.ids, a.batch);
  std::unique_ptr<Workspace> ws = acquire(a.batch);
  const auto& k = kernels();
  const int64_t d = c.hidden_size;
  k.embedding(embeddings_.data, embeddings_.dtype, a.ids, ws->residual, a.batch, d);
  run_layers(*ws, a.batch, true, true, {a.conv_state, a.batch, 0}, {a.ssm_state, a.batch, 0});
  k.rmsnorm(ws->hidden, ws->residual, f32(norm_f_), ws->normed, nullptr, a.batch, d, c.norm_eps);
  k.matmul_step(ws->normed, lm_head_.data, lm_head_.dtype, nullptr, a.logits, a.batch, c.vocab_size, d);
  release(std::move(ws));
}

}  // namespace mssm::model
