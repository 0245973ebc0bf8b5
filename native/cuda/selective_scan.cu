// The Mamba-1 selective scan (S6) on the GPU: the sequence form and the one-token decode update.
//
// Glossary: b batch, t token (L = length), d channel (D = channels = d_inner), n state index
// (N = state), g group of B/C (G = groups), Δ = delta, l lane of a warp. Per channel d of group g:
//   Δ'_t   = softplus(Δ_t + delta_bias)                       (when delta_softplus)
//   s_t[n] = a_t[n]·s_{t-1}[n] + b_t[n],  a_t[n] = exp(Δ'_t·A[d,n]),  b_t[n] = Δ'_t·u_t·B_t[g,n]
//   y_t    = Σ_n s_t[n]·C_t[g,n] + D[d]·u_t ;  y_t *= silu(z_t) when z is given
//
// The sequence form (the fused scan of the Mamba paper, laid out for channels-last tensors):
// a block owns kChannels channels of one group and walks the sequence in chunks of kChunk tokens.
// Per chunk it stages u, Δ and z of its channels ([token][channel] rows of 32 bytes: whole sectors)
// and, kSlice state indices at a time, the group's B and C in shared memory, so each is read from
// device memory once. Warp w owns channel w; lane l owns tokens [l·kItems, (l+1)·kItems) of the chunk.
// For each n the pairs (a_t, b_t) compose associatively,
//   (a1, b1) then (a2, b2) = (a1·a2, a2·b1 + b2),
// so a lane folds its kItems pairs, a warp shuffle scan gives each lane the composition of the lanes
// before it, and applied to the state carried in from the previous chunk that gives the state before
// the lane's first token; the lane then replays its tokens, accumulating y_t += s_t[n]·C_t[n] in
// registers. The carried state (one value per channel and n) lives in shared memory, so any N works
// with one kernel; Δ', Δ'·u and y stay in registers for the whole chunk.
//
// Loads are kept in flight ahead of their use (the kernel has only batch·D/kChannels blocks, 192 for
// mamba-130m at batch 1, so it cannot hide device-memory latency by occupancy): every thread loads
// the next chunk's u, Δ, z (kTokenLoads values each) into registers while the block scans the
// current chunk, and writes them to shared memory when the block gets there; it issues all its loads
// of a slice of B and C (kSliceLoads each, mostly L2 hits: every block of the group reads them)
// before it stores the first.
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_common.cuh"

namespace mssm::cuda {
namespace {

using detail::ceil_div;

constexpr int kChannels = 8;                 // channels per block = warps per block
constexpr int kItems = 8;                    // tokens per lane
constexpr int kChunk = 32 * kItems;          // tokens per chunk
constexpr int kSlice = 8;                    // state indices of B and C staged at a time
constexpr int kThreads = 32 * kChannels;
constexpr int kTokenLoads = kChunk * kChannels / kThreads;  // u, Δ, z values per thread per chunk
constexpr int kSliceLoads = kChunk * kSlice / kThreads;     // B, C values per thread per slice
static_assert(kTokenLoads * kThreads == kChunk * kChannels && kSliceLoads * kThreads == kChunk * kSlice, "");
// Tokens are stored at padded index t + t/kItems: lane l's tokens then start at bank 9·l, distinct
// across the warp. Row lengths (≥ 287) are chosen ≡ 8 and ≡ 4 (mod 32) so that the cooperative
// stores (a warp writes 4 tokens × 8 channels, or 4 tokens × 8 state indices) hit 32 distinct banks.
constexpr int kRowTokens = 296;
constexpr int kRowSlice = 292;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ int padded(int t) { return t + t / kItems; }

struct ScanShared {
  float u[kChannels][kRowTokens];      // u, then y at the end of the chunk
  float delta[kChannels][kRowTokens];  // raw Δ
  float z[kChannels][kRowTokens];
  float B[kSlice][kRowSlice];
  float C[kSlice][kRowSlice];
  // followed in dynamic shared memory by carry[kChannels][N], the state entering the chunk, and
  // A2[kChannels][N] = A·log2(e) (read once per chunk and n, so kept beside the carry)
};

// Two blocks per multiprocessor (at most 128 registers): 192 blocks then run in one wave on 132 SMs.
__global__ void __launch_bounds__(kThreads, 2) selective_scan_kernel(cpu::SelectiveScanArgs args, int64_t tiles) {
  extern __shared__ float4 shared_raw[];
  ScanShared& sh = *reinterpret_cast<ScanShared*>(shared_raw);
  float* carry = reinterpret_cast<float*>(shared_raw) + sizeof(ScanShared) / sizeof(float);

  const int64_t L = args.length, D = args.channels, N = args.state, G = args.groups;
  const int64_t per_group = D / G;
  const int64_t tile = blockIdx.x % tiles;
  const int64_t g = blockIdx.x / tiles % G;
  const int64_t b = blockIdx.x / (tiles * G);
  const int64_t d0 = g * per_group + tile * kChannels;
  const int channels = (int)detail::min64(kChannels, per_group - tile * kChannels);

  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  const bool channel_ok = w < channels;
  const int64_t d = d0 + w;
  const float bias = channel_ok && args.delta_bias ? args.delta_bias[d] : 0.0f;
  const float skip = channel_ok && args.D ? args.D[d] : 0.0f;
  float* my_carry = carry + w * N;
  float* my_A2 = carry + kChannels * N + w * N;

  for (int64_t n = l; n < N; n += 32) {
    my_carry[n] = channel_ok && args.state_in ? args.state_in[(b * D + d) * N + n] : 0.0f;
    my_A2[n] = channel_ok ? args.A[d * N + n] * kLog2e : 0.0f;
  }

  const int64_t bc_stride = G * N;  // between tokens in B and C
  // Register prefetch of the chunk starting at token t (u, Δ, z) and of the slice (t, n0) (B, C).
  float pu[kTokenLoads], pd[kTokenLoads], pz[kTokenLoads], pB[kSliceLoads], pC[kSliceLoads];
  auto load_tokens = [&](int64_t t) {
    const int count = (int)detail::min64(kChunk, L - t);
#pragma unroll
    for (int k = 0; k < kTokenLoads; ++k) {
      const int e = threadIdx.x + k * kThreads, tok = e / kChannels, ch = e % kChannels;
      const bool ok = tok < count && ch < channels;
      const int64_t i = (b * L + t + tok) * D + d0 + ch;
      pu[k] = ok ? args.u[i] : 0.0f;
      pd[k] = ok ? args.delta[i] : 0.0f;
      pz[k] = ok && args.z ? args.z[i] : 0.0f;
    }
  };
  auto store_tokens = [&]() {
#pragma unroll
    for (int k = 0; k < kTokenLoads; ++k) {
      const int e = threadIdx.x + k * kThreads, tok = e / kChannels, ch = e % kChannels;
      sh.u[ch][padded(tok)] = pu[k];
      sh.delta[ch][padded(tok)] = pd[k];
      sh.z[ch][padded(tok)] = pz[k];
    }
  };
  auto load_slice = [&](int64_t t, int64_t n0) {
    const int count = (int)detail::min64(kChunk, L - t);
    const float* Bt = args.B + ((b * L + t) * G + g) * N;
    const float* Ct = args.C + ((b * L + t) * G + g) * N;
#pragma unroll
    for (int k = 0; k < kSliceLoads; ++k) {
      const int e = threadIdx.x + k * kThreads, tok = e / kSlice, n = e % kSlice;
      const bool ok = tok < count && n0 + n < N;
      pB[k] = ok ? Bt[tok * bc_stride + n0 + n] : 0.0f;
      pC[k] = ok ? Ct[tok * bc_stride + n0 + n] : 0.0f;
    }
  };
  auto store_slice = [&]() {
#pragma unroll
    for (int k = 0; k < kSliceLoads; ++k) {
      const int e = threadIdx.x + k * kThreads, tok = e / kSlice, n = e % kSlice;
      sh.B[n][padded(tok)] = pB[k];
      sh.C[n][padded(tok)] = pC[k];
    }
  };

  if (L > 0) load_tokens(0);
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int steps = (int)detail::min64(kChunk, L - t0);
    __syncthreads();  // the previous chunk's y has been stored
    store_tokens();
    __syncthreads();
    if (t0 + kChunk < L) load_tokens(t0 + kChunk);  // in flight while this chunk is scanned

    // Padding tokens and channels get Δ' = 0: a = 1, b = 0, which leaves the carried state unchanged.
    float dt[kItems], dtu[kItems], y[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int tok = l * kItems + i;
      float v = sh.delta[w][padded(tok)] + bias;
      if (args.delta_softplus) v = detail::softplus(v);
      dt[i] = channel_ok && tok < steps ? v : 0.0f;
      dtu[i] = dt[i] * sh.u[w][padded(tok)];
      y[i] = 0.0f;
    }

    for (int64_t n0 = 0; n0 < N; n0 += kSlice) {
      load_slice(t0, n0);  // all of a thread's loads in flight at once
      __syncthreads();     // every warp is done with the previous slice
      store_slice();
      __syncthreads();

#pragma unroll 1
      for (int n = 0; n < kSlice && n0 + n < N; ++n) {
        // exp(Δ'·A) = 2^(Δ'·A·log2 e)
        const float A2 = my_A2[n0 + n];
        float a[kItems], bb[kItems];
        float pa = 1.0f, pb = 0.0f;  // this lane's tokens composed
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          a[i] = exp2f(dt[i] * A2);
          bb[i] = dtu[i] * sh.B[n][padded(l * kItems + i)];
          pa *= a[i];
          pb = fmaf(a[i], pb, bb[i]);
        }
        // Inclusive scan over lanes: compose with the lanes before (earlier tokens come first).
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
          const float qa = __shfl_up_sync(0xffffffffu, pa, offset);
          const float qb = __shfl_up_sync(0xffffffffu, pb, offset);
          if (l >= offset) {
            pb = fmaf(pa, qb, pb);
            pa *= qa;
          }
        }
        float ea = __shfl_up_sync(0xffffffffu, pa, 1), eb = __shfl_up_sync(0xffffffffu, pb, 1);
        if (l == 0) ea = 1.0f, eb = 0.0f;
        const float entering = my_carry[n0 + n];
        float s = fmaf(ea, entering, eb);  // the state before this lane's first token
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          s = fmaf(a[i], s, bb[i]);
          y[i] = fmaf(s, sh.C[n][padded(l * kItems + i)], y[i]);
        }
        const float leaving = __shfl_sync(0xffffffffu, fmaf(pa, entering, pb), 31);
        __syncwarp();  // every lane has read `entering`
        if (l == 0) my_carry[n0 + n] = leaving;
        __syncwarp();
      }
    }

    // y = (Σ s·C + D·u) · silu(z), into the u row (each lane rewrites only its own tokens).
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int p = padded(l * kItems + i);
      float v = fmaf(skip, sh.u[w][p], y[i]);
      if (args.z) v *= detail::silu(sh.z[w][p]);
      sh.u[w][p] = v;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kChunk * kChannels; e += kThreads) {
      const int tok = e / kChannels, ch = e % kChannels;
      if (tok < steps && ch < channels) args.y[(b * L + t0 + tok) * D + d0 + ch] = sh.u[ch][padded(tok)];
    }
  }

  // This block alone read these channels' state_in, before: state_out may alias it.
  __syncwarp();
  if (channel_ok && args.state_out)
    for (int64_t n = l; n < N; n += 32) args.state_out[(b * D + d) * N + n] = my_carry[n];
}

// One token: warp per (b, d), lanes over n.
__global__ void selective_state_update_kernel(cpu::SelectiveScanArgs args) {
  const int64_t D = args.channels, N = args.state, G = args.groups;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // b·D + d
  const int l = threadIdx.x % 32;
  if (row >= args.batch * D) return;
  const int64_t b = row / D, d = row % D, g = d / (D / G);
  float dt = args.delta[row] + (args.delta_bias ? args.delta_bias[d] : 0.0f);
  if (args.delta_softplus) dt = detail::softplus(dt);
  const float u = args.u[row];
  const float* Bv = args.B + (b * G + g) * N;
  const float* Cv = args.C + (b * G + g) * N;
  float acc = 0.0f;
  for (int64_t n = l; n < N; n += 32) {
    const float prev = args.state_in ? args.state_in[row * N + n] : 0.0f;
    const float s = fmaf(expf(dt * args.A[d * N + n]), prev, dt * u * Bv[n]);
    args.state_out[row * N + n] = s;
    acc = fmaf(s, Cv[n], acc);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (l == 0) {
    float v = acc + (args.D ? args.D[d] * u : 0.0f);
    if (args.z) v *= detail::silu(args.z[row]);
    args.y[row] = v;
  }
}

Status check_args(const char* op, const cpu::SelectiveScanArgs& a) {
  if (a.batch < 0 || a.length < 0 || a.channels < 0 || a.state < 0) return detail::error(op, "negative size");
  if (a.groups <= 0 || (a.channels > 0 && a.channels % a.groups != 0))
    return detail::error(op, "channels (" + std::to_string(a.channels) + ") must be a multiple of groups (" +
                                 std::to_string(a.groups) + ")");
  const bool work = a.batch > 0 && a.channels > 0 && a.state > 0;
  if (work && a.length > 0 && (!a.u || !a.delta || !a.B || !a.C || !a.y))
    return detail::error(op, "u, delta, B, C and y must be set");
  if (work && !a.A) return detail::error(op, "A must be set");
  return {};
}

}  // namespace

Status selective_scan(const cpu::SelectiveScanArgs& args, cudaStream_t stream) {
  const char* op = "selective_scan";
  MSSM_STATUS_TRY(check_args(op, args));
  if (args.batch == 0 || args.channels == 0) return {};
  const int64_t tiles = ceil_div(args.channels / args.groups, kChannels);
  const int64_t blocks = args.batch * args.groups * tiles;
  if (blocks > 0x7fffffff) return detail::error(op, "too many blocks");
  const size_t shared = sizeof(ScanShared) + 2 * sizeof(float) * kChannels * args.state;
  if (shared > 48 * 1024) {
    int device = 0, limit = 0;
    MSSM_CUDA_TRY(op, cudaGetDevice(&device));
    MSSM_CUDA_TRY(op, cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    if (shared > (size_t)limit)
      return detail::error(op, "state " + std::to_string(args.state) + " needs " + std::to_string(shared) +
                                   " bytes of shared memory, over this device's " + std::to_string(limit));
    MSSM_CUDA_TRY(op, cudaFuncSetAttribute(selective_scan_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)shared));
  }
  selective_scan_kernel<<<(unsigned)blocks, kThreads, shared, stream>>>(args, tiles);
  return detail::check_launch(op);
}

Status selective_state_update(const cpu::SelectiveScanArgs& args, cudaStream_t stream) {
  const char* op = "selective_state_update";
  MSSM_STATUS_TRY(check_args(op, args));
  if (args.length != 1) return detail::error(op, "length must be 1 (got " + std::to_string(args.length) + ")");
  if (!args.state_out) return detail::error(op, "state_out must be set");
  const int64_t rows = args.batch * args.channels;
  if (rows == 0 || args.state == 0) return {};
  constexpr int kWarps = 8;
  const int64_t blocks = ceil_div(rows, kWarps);
  if (blocks > 0x7fffffff) return detail::error(op, "too many blocks");
  selective_state_update_kernel<<<(unsigned)blocks, 32 * kWarps, 0, stream>>>(args);
  return detail::check_launch(op);
}

}  // namespace mssm::cuda
