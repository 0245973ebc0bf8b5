// The CUDA model runner (cuda_model.h): the CPU runner's computation (native/model/mamba_model.cpp),
// step for step, on the device. Glossary as mamba_model.h: d hidden, di inner, N state, K conv width,
// R dt rank, H/P heads and head size, G groups; M rows of a GEMM (tokens or sequences).
//
// Per layer (prefill: rows = the tokens of one segment of one sequence; decode: rows = sequences):
//   rmsnorm (+ residual add)                         norm.cu
//   in_proj as row blocks of W_in: Mamba-1 x, z; Mamba-2 z, xBC, dt  (so each lands packed)
//   conv1d / conv1d_step (+ SiLU)                    conv1d.cu
//   Mamba-1: x_proj → dbc; B, C split out; dt_proj reads dbc's first R columns in place; the selective
//            scan / state update with the z gate and the dt bias + softplus       selective_scan.cu
//   Mamba-2: x, B, C split out of the conv output; ssd_chunked / ssd_step; gated rmsnorm   ssd.cu
//   out_proj
// A mixture-of-experts layer instead: rmsnorm, router GEMM, moe_route, moe_experts (moe.cu); it keeps
// no state, so the states are indexed by Mamba layer (Config::state_index).
// then the final rmsnorm and lm_head. Everything runs on the runner's stream.
#include "cuda_model.h"

#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

#include "cpu/kernels.h"
#include "cuda_common.cuh"
#include "gemm.cuh"

#ifdef MSSM_HAVE_CUBLAS
#include <cublas_v2.h>
#endif

namespace mssm::cuda {

using detail::ceil_div;
using detail::grid_for;
using detail::to_f32;

bool have_cublas() {
#ifdef MSSM_HAVE_CUBLAS
  return true;
#else
  return false;
#endif
}

namespace {

constexpr int64_t kDefaultSegment = 4096;
#ifdef MSSM_HAVE_CUBLAS
constexpr int64_t kCublasMinRows = detail::kSkinnyMaxRows;  // fewer rows: the weight-streaming kernel
#endif

// ---- small kernels ------------------------------------------------------------------------------

// out[i, :] = table[ids[i], :] as f32. One block-stride loop over count·dim elements.
template <typename T>
__global__ void embedding_kernel(const T* table, const int32_t* ids, float* out, int64_t count, int64_t dim) {
  const int64_t total = count * dim;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / dim, c = i % dim;
    out[i] = to_f32(table[(int64_t)ids[r] * dim + c]);
  }
}

// Copies column ranges of src [rows, width] into up to three packed destinations.
struct SplitArgs {
  float* dst[3];
  int64_t first[3], count[3];
  int parts;
};
__global__ void split_columns_kernel(const float* src, int64_t rows, int64_t width, SplitArgs s, int64_t total_cols) {
  const int64_t total = rows * total_cols;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / total_cols;
    int64_t c = i % total_cols;
    int p = 0;
    while (p + 1 < s.parts && c >= s.count[p]) c -= s.count[p++];
    s.dst[p][r * s.count[p] + c] = src[r * width + s.first[p] + c];
  }
}

#ifdef MSSM_HAVE_CUBLAS
__global__ void add_bias_kernel(float* y, int64_t ldy, const float* bias, int64_t M, int64_t N) {
  const int64_t total = M * N;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    y[(i / N) * ldy + i % N] += bias[i % N];
}

// x = hi + lo, each bf16 (hi = x rounded, lo = the rest rounded): 16 bits of x's mantissa survive, so
// the bf16 tensor-core GEMM of bf16 weights with (hi, lo) is as exact as fp32 activations (ssd.cu uses
// the same split). out: hi [M, K] then lo [M, K].
__global__ void split_bf16_kernel(const float* x, int64_t ldx, __nv_bfloat16* out, int64_t M, int64_t K) {
  const int64_t total = M * K;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const float v = x[(i / K) * ldx + i % K];
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    out[i] = hi;
    out[total + i] = __float2bfloat16_rn(v - __bfloat162float(hi));
  }
}
#endif


// A matrix on the device: [rows, cols] row-major, bf16 or f32.
struct DevMatrix {
  void* ptr = nullptr;
  bool bf16 = false;
  int64_t rows = 0, cols = 0;
  const void* row(int64_t first) const {
    return static_cast<const char*>(ptr) + first * cols * (bf16 ? 2 : 4);
  }
};

struct DevLayer {
  const float *norm = nullptr, *in_proj_bias = nullptr, *conv = nullptr, *conv_bias = nullptr, *dt_bias = nullptr,
              *A = nullptr, *D = nullptr, *ssm_norm = nullptr, *out_proj_bias = nullptr;
  DevMatrix in_proj, x_proj, dt_proj, out_proj;
  // A mixture-of-experts block: router [E, d]; fc1 [E, 2H, d] and fc2 [E, d, H] (rows: all but the last dim).
  const float *router_bias = nullptr, *fc1_bias = nullptr, *fc2_bias = nullptr;
  DevMatrix router, fc1, fc2;
};

// Device scratch for `rows` rows (the Workspace of mamba_model.cpp), one allocation.
struct DevWorkspace {
  int64_t rows = 0;
  void* block = nullptr;
  float *residual = nullptr, *hidden = nullptr, *normed = nullptr;
  float *x = nullptr, *z = nullptr, *xc = nullptr, *delta = nullptr, *y = nullptr, *yn = nullptr;
  float *dbc = nullptr, *B = nullptr, *C = nullptr, *xbc = nullptr, *dt = nullptr;
  __nv_bfloat16* x16 = nullptr;  // activations split for a bf16 cuBLAS GEMM: hi, lo [rows, max K] each
  int32_t* ids = nullptr;        // [rows]
  void* ssd_work = nullptr;
  size_t ssd_bytes = 0;
  // MoE blocks: router logits [rows, E], the routing (weights, indices [rows, k]), moe_experts' scratch.
  float *router_logits = nullptr, *route_weights = nullptr;
  int32_t* route_indices = nullptr;
  void* moe_work = nullptr;

  ~DevWorkspace() {
    if (block) cudaFree(block);
  }
  Status allocate(const model::Config& c, int64_t n_rows, bool need_x16) {
    const char* op = "model workspace";
    // Nothing of the old block stays usable: a failed allocation below leaves an empty workspace (rows
    // 0, so the next call allocates again), never pointers into freed memory.
    if (block) cudaFree(block), block = nullptr;
    rows = 0;
    ssd_work = moe_work = nullptr;
    const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, ch = c.conv_channels();
    struct Slot {
      void** target;
      int64_t bytes;
    };
    std::vector<Slot> slots = {{(void**)&residual, 4 * d}, {(void**)&hidden, 4 * d}, {(void**)&normed, 4 * d},
                               {(void**)&x, 4 * di},       {(void**)&z, 4 * di},      {(void**)&y, 4 * di},
                               {(void**)&ids, 4}};
    if (c.mamba1()) {
      const int64_t R = c.time_step_rank;
      slots.insert(slots.end(), {{(void**)&xc, 4 * di}, {(void**)&delta, 4 * di}, {(void**)&dbc, 4 * (R + 2 * N)},
                                 {(void**)&B, 4 * N}, {(void**)&C, 4 * N}});
    } else {
      const int64_t gn = c.num_groups * N;
      slots.insert(slots.end(), {{(void**)&yn, 4 * di}, {(void**)&xbc, 4 * ch}, {(void**)&xc, 4 * ch},
                                 {(void**)&B, 4 * gn}, {(void**)&C, 4 * gn}, {(void**)&dt, 4 * c.num_heads}});
    }
    if (need_x16) slots.push_back({(void**)&x16, 4 * std::max({d, di, c.time_step_rank})});
    size_t moe_bytes = 0;
    if (!c.moe.layers.empty()) {
      slots.insert(slots.end(), {{(void**)&router_logits, 4 * c.moe.experts}, {(void**)&route_weights, 4 * c.moe.top_k},
                                 {(void**)&route_indices, 4 * c.moe.top_k}});
      moe_bytes = (moe_experts_workspace_bytes(n_rows, c.moe.top_k, d, c.moe.hidden, c.moe.experts) + 255) / 256 * 256;
    }
    int64_t total = 0;
    for (const Slot& s : slots) total += (s.bytes * n_rows + 255) / 256 * 256;
    ssd_bytes = 0;
    if (!c.mamba1()) {
      cpu::SsdArgs a;
      a.batch = 1, a.length = n_rows, a.heads = c.num_heads, a.head_dim = c.head_dim, a.state = N;
      a.groups = c.num_groups;
      ssd_bytes = (ssd_chunked_workspace_bytes(a) + 255) / 256 * 256;
    }
    MSSM_CUDA_TRY(op, cudaMalloc(&block, total + ssd_bytes + moe_bytes + 256));
    char* base = static_cast<char*>(block);
    for (const Slot& s : slots) {
      *s.target = base;
      base += (s.bytes * n_rows + 255) / 256 * 256;
    }
    ssd_work = ssd_bytes ? base : nullptr;
    moe_work = moe_bytes ? base + ssd_bytes : nullptr;
    rows = n_rows;
    return {};
  }
};

struct DecodeSlot {
  DevWorkspace ws;
  int32_t* host_ids = nullptr;  // pinned [batch]: the graph copies the ids from here
  cudaGraphExec_t exec = nullptr;
  float *conv = nullptr, *ssm = nullptr, *logits = nullptr;  // the pointers the graph was captured with
  ~DecodeSlot() {
    if (exec) cudaGraphExecDestroy(exec);
    if (host_ids) cudaFreeHost(host_ids);
  }
};

}  // namespace

struct CudaModel::Impl {
  model::Config c;
  ModelOptions opt;
  cudaStream_t stream = nullptr;
  std::vector<void*> allocations;
  DevMatrix embeddings, lm_head;
  const float* norm_f = nullptr;
  std::vector<DevLayer> layers;
  DevWorkspace prefill;
  std::vector<float*> own_state;  // [0] conv, [1] ssm of one sequence when the caller keeps none
  int64_t own_state_ok = 0;
  std::map<int64_t, std::unique_ptr<DecodeSlot>> slots;
  bool cublas_on = false;
#ifdef MSSM_HAVE_CUBLAS
  cublasHandle_t cublas = nullptr;
  void* cublas_work = nullptr;
#endif

  ~Impl() {
    slots.clear();
#ifdef MSSM_HAVE_CUBLAS
    if (cublas) cublasDestroy(cublas);
    if (cublas_work) cudaFree(cublas_work);
#endif
    for (void* p : allocations) cudaFree(p);
  }

  Status upload_vector(const model::Weight& w, const float** out, int64_t& bytes) {
    if (!w.data) {
      *out = nullptr;
      return {};
    }
    int64_t n = 1;
    for (int64_t s : w.shape) n *= s;
    void* p = nullptr;
    MSSM_CUDA_TRY("model upload", cudaMalloc(&p, std::max<int64_t>(n, 1) * 4));
    allocations.push_back(p);
    MSSM_CUDA_TRY("model upload", cudaMemcpy(p, w.data, n * 4, cudaMemcpyHostToDevice));
    *out = static_cast<const float*>(p);
    bytes += n * 4;
    return {};
  }

  Status upload_matrix(const model::Weight& w, DevMatrix* out, int64_t& bytes) {
    int64_t n = 1;
    for (int64_t s : w.shape) n *= s;
    const int64_t cols = w.shape.back(), rows = cols ? n / cols : 0;
    const bool bf16 = opt.weights == WeightDType::bf16;
    void* p = nullptr;
    const int64_t size = n * (bf16 ? 2 : 4);
    MSSM_CUDA_TRY("model upload", cudaMalloc(&p, std::max<int64_t>(size, 16)));
    allocations.push_back(p);
    const DType want = bf16 ? DType::bf16 : DType::f32;
    if (w.dtype == want) {
      MSSM_CUDA_TRY("model upload", cudaMemcpy(p, w.data, size, cudaMemcpyHostToDevice));
    } else {
      const auto& k = cpu::kernels();
      std::vector<float> f32;
      const float* src = static_cast<const float*>(w.data);
      if (w.dtype != DType::f32) {
        f32.resize(n);
        k.convert(w.data, w.dtype, f32.data(), DType::f32, n);
        src = f32.data();
      }
      if (bf16) {
        std::vector<uint16_t> h(n);
        k.convert(src, DType::f32, h.data(), DType::bf16, n);
        MSSM_CUDA_TRY("model upload", cudaMemcpy(p, h.data(), size, cudaMemcpyHostToDevice));
      } else {
        MSSM_CUDA_TRY("model upload", cudaMemcpy(p, src, size, cudaMemcpyHostToDevice));
      }
    }
    *out = DevMatrix{p, bf16, rows, cols};
    bytes += size;
    return {};
  }

  // ---- enqueue helpers ----------------------------------------------------------------------------
  Status gemm(const float* x, int64_t ldx, const DevMatrix& W, int64_t first_row, int64_t N, const float* bias,
              float* y, int64_t ldy, int64_t M, DevWorkspace& ws) {
    const int64_t K = W.cols;
    if (M == 0 || N == 0) return {};
    const void* w = W.row(first_row);
#ifdef MSSM_HAVE_CUBLAS
    if (cublas_on && M >= kCublasMinRows) {
      const char* op = "model gemm";
      const float one = 1.0f, zero = 0.0f;
      cublasStatus_t st;
      if (W.bf16) {
        // y = W·hiᵀ + W·loᵀ: two bf16 tensor-core GEMMs, the second accumulating into y.
        split_bf16_kernel<<<grid_for(M * K), 256, 0, stream>>>(x, ldx, ws.x16, M, K);
        MSSM_STATUS_TRY(detail::check_launch(op));
        st = cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, w, CUDA_R_16BF, (int)K,
                          ws.x16, CUDA_R_16BF, (int)K, &zero, y, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT);
        if (st == CUBLAS_STATUS_SUCCESS)
          st = cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, w, CUDA_R_16BF, (int)K,
                            ws.x16 + M * K, CUDA_R_16BF, (int)K, &one, y, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT);
      } else {
        st = cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, (int)N, (int)M, (int)K, &one, w, CUDA_R_32F, (int)K, x,
                          CUDA_R_32F, (int)ldx, &zero, y, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT);
      }
      if (st != CUBLAS_STATUS_SUCCESS)
        return detail::error(op, std::string("cublasGemmEx failed: ") + cublasGetStatusString(st) + " (M " +
                                     std::to_string(M) + ", N " + std::to_string(N) + ", K " + std::to_string(K) + ")");
      if (bias) {
        add_bias_kernel<<<grid_for(M * N), 256, 0, stream>>>(y, ldy, bias, M, N);
        return detail::check_launch(op);
      }
      return {};
    }
#else
    (void)ws;
#endif
    return detail::builtin_gemm(x, ldx, w, W.bf16, bias, y, ldy, M, N, K, stream);
  }

  Status split(const float* src, int64_t rows, int64_t width, std::initializer_list<std::pair<float*, int64_t>> parts,
               int64_t first) {
    SplitArgs s{};
    int64_t cols = 0;
    s.parts = 0;
    for (const auto& p : parts) {
      s.dst[s.parts] = p.first;
      s.first[s.parts] = first + cols;
      s.count[s.parts] = p.second;
      cols += p.second;
      ++s.parts;
    }
    split_columns_kernel<<<grid_for(rows * cols), 256, 0, stream>>>(src, rows, width, s, cols);
    return detail::check_launch("model split");
  }

  Status embed(const int32_t* ids, float* out, int64_t count) {
    const int64_t d = c.hidden_size;
    if (embeddings.bf16)
      embedding_kernel<<<grid_for(count * d), 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(embeddings.ptr), ids,
                                                                out, count, d);
    else
      embedding_kernel<<<grid_for(count * d), 256, 0, stream>>>(static_cast<const float*>(embeddings.ptr), ids, out,
                                                                count, d);
    return detail::check_launch("model embedding");
  }

  Status mixer_mamba1(DevWorkspace& ws, const DevLayer& w, int64_t rows, bool decode, const float* conv_in,
                      float* conv_out, const float* ssm_in, float* ssm_out) {
    const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, R = c.time_step_rank;
    const float* bias = w.in_proj_bias;
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.in_proj, 0, di, bias, ws.x, di, rows, ws));
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.in_proj, di, di, bias ? bias + di : nullptr, ws.z, di, rows, ws));
    if (decode) {
      MSSM_STATUS_TRY(conv1d_step(ws.x, w.conv, w.conv_bias, conv_out, ws.xc, rows, di, c.conv_kernel, true, stream));
    } else {
      MSSM_STATUS_TRY(
          conv1d(ws.x, w.conv, w.conv_bias, conv_in, conv_out, ws.xc, 1, rows, di, c.conv_kernel, true, stream));
    }
    const int64_t width = R + 2 * N;
    MSSM_STATUS_TRY(gemm(ws.xc, di, w.x_proj, 0, width, nullptr, ws.dbc, width, rows, ws));
    MSSM_STATUS_TRY(split(ws.dbc, rows, width, {{ws.B, N}, {ws.C, N}}, R));
    MSSM_STATUS_TRY(gemm(ws.dbc, width, w.dt_proj, 0, di, nullptr, ws.delta, di, rows, ws));
    cpu::SelectiveScanArgs s;
    s.batch = decode ? rows : 1;
    s.length = decode ? 1 : rows;
    s.channels = di;
    s.state = N;
    s.groups = 1;
    s.u = ws.xc;
    s.delta = ws.delta;
    s.A = w.A;
    s.B = ws.B;
    s.C = ws.C;
    s.D = w.D;
    s.z = ws.z;
    s.delta_bias = w.dt_bias;
    s.delta_softplus = true;
    s.state_in = ssm_in;
    s.state_out = ssm_out;
    s.y = ws.y;
    MSSM_STATUS_TRY(decode ? selective_state_update(s, stream) : selective_scan(s, stream));
    return gemm(ws.y, di, w.out_proj, 0, d, w.out_proj_bias, ws.hidden, d, rows, ws);
  }

  Status mixer_mamba2(DevWorkspace& ws, const DevLayer& w, int64_t rows, bool decode, const float* conv_in,
                      float* conv_out, const float* ssm_in, float* ssm_out) {
    const int64_t d = c.hidden_size, di = c.intermediate_size, N = c.state_size, H = c.num_heads;
    const int64_t gn = c.num_groups * N, ch = c.conv_channels();
    const float* bias = w.in_proj_bias;
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.in_proj, 0, di, bias, ws.z, di, rows, ws));
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.in_proj, di, ch, bias ? bias + di : nullptr, ws.xbc, ch, rows, ws));
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.in_proj, di + ch, H, bias ? bias + di + ch : nullptr, ws.dt, H, rows, ws));
    if (decode) {
      MSSM_STATUS_TRY(conv1d_step(ws.xbc, w.conv, w.conv_bias, conv_out, ws.xc, rows, ch, c.conv_kernel, true, stream));
    } else {
      MSSM_STATUS_TRY(
          conv1d(ws.xbc, w.conv, w.conv_bias, conv_in, conv_out, ws.xc, 1, rows, ch, c.conv_kernel, true, stream));
    }
    MSSM_STATUS_TRY(split(ws.xc, rows, ch, {{ws.x, di}, {ws.B, gn}, {ws.C, gn}}, 0));
    cpu::SsdArgs s;
    s.batch = decode ? rows : 1;
    s.length = decode ? 1 : rows;
    s.heads = H;
    s.head_dim = c.head_dim;
    s.state = N;
    s.groups = c.num_groups;
    s.chunk_size = c.chunk_size;
    s.x = ws.x;
    s.dt = ws.dt;
    s.A = w.A;
    s.B = ws.B;
    s.C = ws.C;
    s.D = w.D;
    s.z = nullptr;
    s.dt_bias = w.dt_bias;
    s.dt_softplus = true;
    s.dt_min = c.time_step_min;
    s.dt_max = c.time_step_max;
    s.state_in = ssm_in;
    s.state_out = ssm_out;
    s.y = ws.y;
    MSSM_STATUS_TRY(decode ? ssd_step(s, stream) : ssd_chunked(s, opt.ssd_math, ws.ssd_work, stream));
    MSSM_STATUS_TRY(gated_rmsnorm(ws.y, ws.z, w.ssm_norm, ws.yn, rows, di, di / c.num_groups, c.norm_eps,
                                  c.norm_before_gate, stream));
    return gemm(ws.yn, di, w.out_proj, 0, d, w.out_proj_bias, ws.hidden, d, rows, ws);
  }

  // A mixture-of-experts block on ws.normed into ws.hidden (model::Model::moe_block's steps).
  Status moe_block(DevWorkspace& ws, const DevLayer& w, int64_t rows) {
    const model::MoeConfig& m = c.moe;
    const int64_t d = c.hidden_size;
    MSSM_STATUS_TRY(gemm(ws.normed, d, w.router, 0, m.experts, w.router_bias, ws.router_logits, m.experts, rows, ws));
    MSSM_STATUS_TRY(moe_route(ws.router_logits, rows, m.experts, m.top_k, m.scoring, m.renormalize, ws.route_weights,
                              ws.route_indices, stream));
    cpu::MoeExpertsArgs e = c.moe_experts_args(rows, ws.normed, ws.route_indices, ws.route_weights, ws.hidden);
    e.fc1 = w.fc1.ptr, e.fc1_dtype = w.fc1.bf16 ? DType::bf16 : DType::f32, e.fc1_bias = w.fc1_bias;
    e.fc2 = w.fc2.ptr, e.fc2_dtype = w.fc2.bf16 ? DType::bf16 : DType::f32, e.fc2_bias = w.fc2_bias;
    return moe_experts(e, ws.moe_work, stream);
  }

  // Every layer over `rows` rows. The states of this pass's sequence: Mamba layer l (state_index) at
  // conv + l·conv_batch·floats and ssm + l·ssm_batch·floats (the pointers already at the sequence).
  Status run_layers(DevWorkspace& ws, int64_t rows, bool decode, bool read_state, float* conv, int64_t conv_batch,
                    float* ssm, int64_t ssm_batch) {
    const int64_t d = c.hidden_size;
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const DevLayer& w = layers[i];
      if (i == 0) {
        MSSM_STATUS_TRY(rmsnorm(ws.residual, nullptr, w.norm, ws.normed, nullptr, rows, d, c.norm_eps, stream));
      } else {
        MSSM_STATUS_TRY(rmsnorm(ws.hidden, ws.residual, w.norm, ws.normed, ws.residual, rows, d, c.norm_eps, stream));
      }
      if (c.is_moe_layer(i)) {
        MSSM_STATUS_TRY(moe_block(ws, w, rows));
        continue;
      }
      const int64_t l = c.state_index(i);
      float* cs = conv + l * conv_batch * c.conv_state_floats();
      float* ss = ssm + l * ssm_batch * c.ssm_state_floats();
      const float* cin = read_state ? cs : nullptr;
      const float* sin = read_state ? ss : nullptr;
      MSSM_STATUS_TRY(c.mamba1() ? mixer_mamba1(ws, w, rows, decode, cin, cs, sin, ss)
                                 : mixer_mamba2(ws, w, rows, decode, cin, cs, sin, ss));
    }
    return {};
  }

  // The whole decode step on the stream (captured into a graph, or run as is).
  Status enqueue_step(DecodeSlot& slot, int64_t batch, float* conv, float* ssm, float* logits) {
    DevWorkspace& ws = slot.ws;
    MSSM_CUDA_TRY("model step", cudaMemcpyAsync(ws.ids, slot.host_ids, batch * sizeof(int32_t),
                                                cudaMemcpyHostToDevice, stream));
    MSSM_STATUS_TRY(embed(ws.ids, ws.residual, batch));
    MSSM_STATUS_TRY(run_layers(ws, batch, true, true, conv, batch, ssm, batch));
    MSSM_STATUS_TRY(rmsnorm(ws.hidden, ws.residual, norm_f, ws.normed, nullptr, batch, c.hidden_size, c.norm_eps,
                            stream));
    return gemm(ws.normed, c.hidden_size, lm_head, 0, c.vocab_size, nullptr, logits, c.vocab_size, batch, ws);
  }
};

bool CudaModel::uses_cublas() const { return impl_ && impl_->cublas_on; }

Status CudaModel::create(const model::Config& config, const std::unordered_map<std::string, model::Weight>& weights,
                         const ModelOptions& options, std::unique_ptr<CudaModel>* out) {
  const char* op = "model";
  out->reset();
  // The CPU runner's checks, word for word: a Model only checks and keeps pointers.
  try {
    model::Model check(config, weights);
  } catch (const std::exception& e) {
    return detail::error(op, e.what());
  }
  if (options.gemm == GemmBackend::cublas && !have_cublas())
    return detail::error(op, "GemmBackend::cublas asked for, but this build has no cuBLAS");
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess)
    return detail::error(op, std::string("no usable CUDA device or driver: cudaGetDeviceCount failed: ") +
                                 cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  if (count == 0) return detail::error(op, "no CUDA device present");
  if (options.device < 0 || options.device >= count)
    return detail::error(op, "device " + std::to_string(options.device) + " does not exist (" +
                                 std::to_string(count) + " present)");
  MSSM_CUDA_TRY(op, cudaSetDevice(options.device));

  std::unique_ptr<CudaModel> m(new CudaModel());
  m->config_ = config;
  m->options_ = options;
  m->impl_.reset(new Impl());
  Impl& im = *m->impl_;
  im.c = config;
  im.opt = options;
  MSSM_CUDA_TRY(op, cudaStreamCreateWithFlags(&im.stream, cudaStreamNonBlocking));
  m->stream_ = im.stream;
#ifdef MSSM_HAVE_CUBLAS
  if (options.gemm != GemmBackend::builtin) {
    cublasStatus_t st = cublasCreate(&im.cublas);
    if (st != CUBLAS_STATUS_SUCCESS) return detail::error(op, std::string("cublasCreate: ") + cublasGetStatusString(st));
    // A workspace of our own, so that no GEMM allocates while a decode step is being captured.
    const size_t work_bytes = 32u << 20;
    MSSM_CUDA_TRY(op, cudaMalloc(&im.cublas_work, work_bytes));
    if (cublasSetWorkspace(im.cublas, im.cublas_work, work_bytes) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(im.cublas, im.stream) != CUBLAS_STATUS_SUCCESS ||
        cublasSetMathMode(im.cublas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS)
      return detail::error(op, "cublas setup failed");
    im.cublas_on = true;
  }
#endif

  int64_t bytes = 0;
  auto get = [&](const std::string& name) -> const model::Weight& {
    static const model::Weight none{};
    auto it = weights.find(name);
    return it == weights.end() ? none : it->second;
  };
  MSSM_STATUS_TRY(im.upload_matrix(get("embeddings"), &im.embeddings, bytes));
  if (config.tie_embeddings) {
    im.lm_head = im.embeddings;
  } else {
    MSSM_STATUS_TRY(im.upload_matrix(get("lm_head"), &im.lm_head, bytes));
  }
  MSSM_STATUS_TRY(im.upload_vector(get("norm_f"), &im.norm_f, bytes));
  im.layers.resize(config.num_layers);
  for (int64_t i = 0; i < config.num_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    DevLayer& l = im.layers[i];
    MSSM_STATUS_TRY(im.upload_vector(get(p + "norm"), &l.norm, bytes));
    if (config.is_moe_layer(i)) {
      MSSM_STATUS_TRY(im.upload_matrix(get(p + "router"), &l.router, bytes));
      MSSM_STATUS_TRY(im.upload_vector(get(p + "router_bias"), &l.router_bias, bytes));
      MSSM_STATUS_TRY(im.upload_matrix(get(p + "fc1"), &l.fc1, bytes));
      MSSM_STATUS_TRY(im.upload_vector(get(p + "fc1_bias"), &l.fc1_bias, bytes));
      MSSM_STATUS_TRY(im.upload_matrix(get(p + "fc2"), &l.fc2, bytes));
      MSSM_STATUS_TRY(im.upload_vector(get(p + "fc2_bias"), &l.fc2_bias, bytes));
      continue;
    }
    MSSM_STATUS_TRY(im.upload_matrix(get(p + "in_proj"), &l.in_proj, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "in_proj_bias"), &l.in_proj_bias, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "conv"), &l.conv, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "conv_bias"), &l.conv_bias, bytes));
    if (config.mamba1()) {
      MSSM_STATUS_TRY(im.upload_matrix(get(p + "x_proj"), &l.x_proj, bytes));
      MSSM_STATUS_TRY(im.upload_matrix(get(p + "dt_proj"), &l.dt_proj, bytes));
    } else {
      MSSM_STATUS_TRY(im.upload_vector(get(p + "ssm_norm"), &l.ssm_norm, bytes));
    }
    MSSM_STATUS_TRY(im.upload_vector(get(p + "dt_bias"), &l.dt_bias, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "A"), &l.A, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "D"), &l.D, bytes));
    MSSM_STATUS_TRY(im.upload_matrix(get(p + "out_proj"), &l.out_proj, bytes));
    MSSM_STATUS_TRY(im.upload_vector(get(p + "out_proj_bias"), &l.out_proj_bias, bytes));
  }
  m->weight_bytes_ = bytes;
  *out = std::move(m);
  return {};
}

CudaModel::~CudaModel() {
  if (impl_) {
    cudaStreamSynchronize(stream_);
    impl_.reset();
  }
  if (stream_) cudaStreamDestroy(stream_);
}

namespace {
Status check_ids(const int32_t* ids, int64_t count, int64_t vocab, const char* op) {
  for (int64_t i = 0; i < count; ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      return detail::error(op, "token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                   " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
  return {};
}
}  // namespace

Status CudaModel::forward(const ForwardArgs& a) {
  const char* op = "forward";
  Impl& im = *impl_;
  const model::Config& c = config_;
  if (a.sequences < 1) return detail::error(op, "at least one sequence is needed");
  if (!a.ids || !a.lengths || !a.logits) return detail::error(op, "ids, lengths and logits are required");
  if (a.use_initial_state && (!a.conv_state || !a.ssm_state))
    return detail::error(op, "useInitialState needs both convState and ssmState");
  int64_t total = 0, longest = 0;
  for (int64_t s = 0; s < a.sequences; ++s) {
    if (a.lengths[s] < 1)
      return detail::error(op, "sequence " + std::to_string(s) + " has length " + std::to_string(a.lengths[s]) +
                                   "; every sequence needs at least one token");
    total += a.lengths[s];
    longest = std::max(longest, a.lengths[s]);
  }
  if (a.padded_length > 0 && longest > a.padded_length)
    return detail::error(op, "a sequence of " + std::to_string(longest) + " tokens does not fit logits padded to " +
                                 std::to_string(a.padded_length));
  MSSM_STATUS_TRY(check_ids(a.ids, total, c.vocab_size, op));
  const int64_t segment = a.segment_tokens > 0 ? a.segment_tokens : kDefaultSegment;
  const int64_t rows_max = std::min(segment, longest);
  DevWorkspace& ws = im.prefill;
  if (ws.rows < rows_max) MSSM_STATUS_TRY(ws.allocate(c, rows_max, im.cublas_on));
  const bool own_conv = !a.conv_state, own_ssm = !a.ssm_state;
  if ((own_conv || own_ssm) && !im.own_state_ok) {
    im.own_state.assign(2, nullptr);
    MSSM_CUDA_TRY(op, cudaMalloc(&im.own_state[0], std::max<int64_t>(1, c.state_layers() * c.conv_state_floats()) * 4));
    im.allocations.push_back(im.own_state[0]);
    MSSM_CUDA_TRY(op, cudaMalloc(&im.own_state[1], std::max<int64_t>(1, c.state_layers() * c.ssm_state_floats()) * 4));
    im.allocations.push_back(im.own_state[1]);
    im.own_state_ok = 1;
  }
  const int64_t d = c.hidden_size, vocab = c.vocab_size;
  int64_t start = 0;
  for (int64_t s = 0; s < a.sequences; ++s) {
    const int64_t length = a.lengths[s];
    float* conv = own_conv ? im.own_state[0] : a.conv_state;
    float* ssm = own_ssm ? im.own_state[1] : a.ssm_state;
    // The caller's states hold every sequence (batch = sequences); our own hold one.
    const int64_t conv_batch = own_conv ? 1 : a.sequences, conv_index = own_conv ? 0 : s;
    const int64_t ssm_batch = own_ssm ? 1 : a.sequences, ssm_index = own_ssm ? 0 : s;
    for (int64_t offset = 0; offset < length; offset += segment) {
      const int64_t rows = std::min(segment, length - offset);
      const bool read_state = offset > 0 || a.use_initial_state;
      MSSM_CUDA_TRY(op, cudaMemcpyAsync(ws.ids, a.ids + start + offset, rows * sizeof(int32_t),
                                        cudaMemcpyHostToDevice, im.stream));
      MSSM_STATUS_TRY(im.embed(ws.ids, ws.residual, rows));
      // Mamba layer l of sequence s: base + (l·batch + index)·floats, for each state its own (batch, index).
      // (The id copy is stream-ordered: the next segment's copy waits for this one's kernels.)
      float* conv_base = conv + conv_index * c.conv_state_floats();
      float* ssm_base = ssm + ssm_index * c.ssm_state_floats();
      MSSM_STATUS_TRY(im.run_layers(ws, rows, false, read_state, conv_base, conv_batch, ssm_base, ssm_batch));
      const bool last_segment = offset + rows == length;
      if (a.last_only) {
        if (last_segment) {
          const int64_t r = rows - 1;
          MSSM_STATUS_TRY(rmsnorm(ws.hidden + r * d, ws.residual + r * d, im.norm_f, ws.normed, nullptr, 1, d,
                                  c.norm_eps, im.stream));
          MSSM_STATUS_TRY(im.gemm(ws.normed, d, im.lm_head, 0, vocab, nullptr, a.logits + s * vocab, vocab, 1, ws));
        }
      } else {
        MSSM_STATUS_TRY(rmsnorm(ws.hidden, ws.residual, im.norm_f, ws.normed, nullptr, rows, d, c.norm_eps, im.stream));
        const int64_t first_row = (a.padded_length > 0 ? s * a.padded_length : start) + offset;
        MSSM_STATUS_TRY(
            im.gemm(ws.normed, d, im.lm_head, 0, vocab, nullptr, a.logits + first_row * vocab, vocab, rows, ws));
      }
    }
    start += length;
  }
  MSSM_CUDA_TRY(op, cudaStreamSynchronize(im.stream));
  return {};
}

Status CudaModel::step(const StepArgs& a) {
  const char* op = "step";
  Impl& im = *impl_;
  const model::Config& c = config_;
  if (a.batch < 1) return detail::error(op, "batch must be at least 1");
  if (!a.ids || !a.conv_state || !a.ssm_state || !a.logits)
    return detail::error(op, "ids, convState, ssmState and logits are required");
  MSSM_STATUS_TRY(check_ids(a.ids, a.batch, c.vocab_size, op));
  std::unique_ptr<DecodeSlot>& slot_ptr = im.slots[a.batch];
  if (!slot_ptr) {
    std::unique_ptr<DecodeSlot> slot(new DecodeSlot());
    MSSM_STATUS_TRY(slot->ws.allocate(c, a.batch, im.cublas_on));
    MSSM_CUDA_TRY(op, cudaMallocHost(&slot->host_ids, a.batch * sizeof(int32_t)));
    slot_ptr = std::move(slot);
  }
  DecodeSlot& slot = *slot_ptr;
  // The previous step on this slot has finished (every call synchronises), so the pinned ids are free.
  std::memcpy(slot.host_ids, a.ids, a.batch * sizeof(int32_t));
  if (!options_.use_graphs) {
    MSSM_STATUS_TRY(im.enqueue_step(slot, a.batch, a.conv_state, a.ssm_state, a.logits));
  } else {
    if (slot.exec && (slot.conv != a.conv_state || slot.ssm != a.ssm_state || slot.logits != a.logits)) {
      cudaGraphExecDestroy(slot.exec);
      slot.exec = nullptr;
    }
    if (!slot.exec) {
      MSSM_CUDA_TRY(op, cudaStreamBeginCapture(im.stream, cudaStreamCaptureModeThreadLocal));
      const Status s = im.enqueue_step(slot, a.batch, a.conv_state, a.ssm_state, a.logits);
      cudaGraph_t graph = nullptr;
      const cudaError_t e = cudaStreamEndCapture(im.stream, &graph);
      if (!s.ok()) {
        if (graph) cudaGraphDestroy(graph);
        cudaGetLastError();
        return s;
      }
      if (e != cudaSuccess) return detail::cuda_error(op, "cudaStreamEndCapture", e);
      const cudaError_t ie = cudaGraphInstantiate(&slot.exec, graph, 0);
      cudaGraphDestroy(graph);
      if (ie != cudaSuccess) {
        slot.exec = nullptr;
        return detail::cuda_error(op, "cudaGraphInstantiate", ie);
      }
      slot.conv = a.conv_state, slot.ssm = a.ssm_state, slot.logits = a.logits;
    }
    MSSM_CUDA_TRY(op, cudaGraphLaunch(slot.exec, im.stream));
  }
  if (a.synchronize) MSSM_CUDA_TRY(op, cudaStreamSynchronize(im.stream));
  return {};
}

}  // namespace mssm::cuda
