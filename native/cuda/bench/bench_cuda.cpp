// bench_cuda: the CUDA kernels' speed against the device's measured memory bandwidth.
//
//   1 device copy bandwidth: cudaMemcpy device-to-device of 1 GiB, bytes read + written
//   2 selective scan forward (batch 1, d_inner 1536, N 16, z gate, softplus): throughput as a
//     fraction of (1), counting the fewest bytes the op must move (u, Δ, z, B, C read once, y written)
//   3 SSD chunked (fp32 and bf16 tensor cores; 24 heads × 64, one group) against the Mamba-1 scan at
//     the same (batch, length, d_inner) for N = 16, 64, 128, 256
//   4 decode: one-step kernels for mamba-130m-like (d_inner 1536, N 16, conv 4) and mamba2-130m-like
//     (24 heads × 64, N 128, conv over 1792 channels) layer shapes, batch 1 and 64. Layer kernel time
//     only (no matmuls, norms or sampling), averaged over back-to-back launches, so launch overhead
//     is included.
//   5 SSD training backward (24 heads × 64, one group, chunk 64, length 4096) for N = 64, 128, 256: the
//     recurrent form against the chunked form with fp32 and with split bf16 tiles
// Times: CUDA events, warm-up first, median of repeats. Prints a table and one JSON line.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_kernels.h"
#include "bench_util.h"

using namespace mssm;
using namespace mssm::cuda::bench;

const char* const mssm::cuda::bench::kProgram = "bench_cuda";

namespace {


float* alloc(size_t n) {
  float* p = nullptr;
  CK(cudaMalloc(&p, n * sizeof(float)));
  return p;
}

// Random values in [lo, hi) from a counter hash (never zeros as a whole tensor), filled on the host
// in blocks and copied, so the benchmark needs no kernel of its own.
void fill(float* dev, size_t n, float lo, float hi, uint64_t seed) {
  const size_t block = 1 << 22;
  std::vector<float> host(std::min(n, block));
  for (size_t at = 0; at < n; at += block) {
    const size_t m = std::min(block, n - at);
    for (size_t i = 0; i < m; ++i) {
      uint64_t z = (seed + at + i) * 0x9e3779b97f4a7c15ull;
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      host[i] = lo + (hi - lo) * (float)((z >> 40) * (1.0 / 16777216.0));
    }
    CK(cudaMemcpy(dev + at, host.data(), m * sizeof(float), cudaMemcpyHostToDevice));
  }
}

// Median milliseconds of `body` (one call = `inner` launches, reported per launch).
template <typename F>
double time_ms(F body, int warmup, int repeats, int inner = 1) {
  cudaEvent_t start, stop;
  CK(cudaEventCreate(&start));
  CK(cudaEventCreate(&stop));
  for (int i = 0; i < warmup; ++i) body();
  CK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    CK(cudaEventRecord(start));
    for (int i = 0; i < inner; ++i) body();
    CK(cudaEventRecord(stop));
    CK(cudaEventSynchronize(stop));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, start, stop));
    t.push_back(ms / inner);
  }
  CK(cudaGetLastError());
  CK(cudaEventDestroy(start));
  CK(cudaEventDestroy(stop));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

std::string json;
void add_json(const std::string& field) { json += (json.empty() ? "" : ",") + field; }

}  // namespace

int main() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::fprintf(stderr, "bench_cuda: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, %.0f MiB\n", prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1048576.0);

  // ---- 1 bandwidth ------------------------------------------------------------------------------
  const size_t copy_bytes = size_t(1) << 30;
  float* src = alloc(copy_bytes / 4);
  float* dst = alloc(copy_bytes / 4);
  fill(src, copy_bytes / 4, -1, 1, 1);
  const double copy_ms = time_ms([&] { CK(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); }, 3, 15);
  const double bw = 2.0 * copy_bytes / (copy_ms * 1e-3);  // bytes/s, read + written
  CK(cudaFree(src));
  CK(cudaFree(dst));
  std::printf("\ncopy bandwidth (D2D, read+write): %.0f GB/s\n", bw / 1e9);
  add_json("\"device\":\"" + std::string(prop.name) + "\"");
  add_json("\"copy_GBps\":" + std::to_string(bw / 1e9));

  // ---- 2 selective scan vs length -------------------------------------------------------------
  const int64_t D = 1536, N16 = 16;
  const int64_t lengths[] = {2048, 8192, 32768, 131072, 262144};
  const int64_t Lmax = 262144;
  float *u = alloc(Lmax * D), *delta = alloc(Lmax * D), *z = alloc(Lmax * D), *y = alloc(Lmax * D);
  const int64_t Nmax = 256;
  float *Bm = alloc(Lmax * Nmax), *Cm = alloc(Lmax * Nmax);  // sized for the N sweep at shorter lengths
  float *A = alloc(D * Nmax), *Dskip = alloc(D), *bias = alloc(D);
  float *state = alloc(D * Nmax);
  fill(u, Lmax * D, -2, 2, 10);
  fill(delta, Lmax * D, -4, 1, 11);
  fill(z, Lmax * D, -3, 3, 12);
  fill(Bm, Lmax * Nmax, -1.5f, 1.5f, 13);
  fill(Cm, Lmax * Nmax, -1.5f, 1.5f, 14);
  fill(A, D * Nmax, -4, -0.1f, 15);
  fill(Dskip, D, -1, 1, 16);
  fill(bias, D, -1, 1, 17);
  auto scan_args = [&](int64_t L, int64_t N) {
    cpu::SelectiveScanArgs a;
    a.batch = 1, a.length = L, a.channels = D, a.state = N, a.groups = 1;
    a.u = u, a.delta = delta, a.A = A, a.B = Bm, a.C = Cm, a.D = Dskip, a.z = z, a.delta_bias = bias;
    a.delta_softplus = true, a.state_out = state, a.y = y;
    return a;
  };
  std::printf("\nselective scan forward (batch 1, d_inner %lld, N %lld, z gate, softplus)\n", (long long)D,
              (long long)N16);
  std::printf("%10s %12s %12s %14s\n", "length", "ms", "GB/s", "of copy bw");
  std::string scan_json;
  for (int64_t L : lengths) {
    const auto a = scan_args(L, N16);
    const double ms = time_ms([&] { check(cuda::selective_scan(a, nullptr)); }, 2, L >= 131072 ? 5 : 15);
    const double bytes = (double)L * (4 * D + 2 * N16) * 4 + 2.0 * D * N16 * 4;
    const double gbps = bytes / (ms * 1e-3) / 1e9;
    std::printf("%10lld %12.3f %12.0f %13.1f%%\n", (long long)L, ms, gbps, 100 * gbps * 1e9 / bw);
    scan_json += (scan_json.empty() ? "" : ",") + std::string("{\"length\":") + std::to_string(L) +
                 ",\"ms\":" + std::to_string(ms) + ",\"fraction_of_bw\":" + std::to_string(gbps * 1e9 / bw) + "}";
  }
  add_json("\"selective_scan\":[" + scan_json + "]");

  // ---- 3 SSD chunked vs selective scan at large N ------------------------------------------------
  const int64_t Lssd = 16384, H = 24, P = 64;  // H·P = d_inner
  float *dt = alloc(Lssd * H), *Ah = alloc(H), *Dh = alloc(H), *dtb = alloc(H), *ssd_state = alloc(H * P * Nmax);
  fill(dt, Lssd * H, -4, 1, 20);
  fill(Ah, H, -4, -0.5f, 21);
  fill(Dh, H, -1, 1, 22);
  fill(dtb, H, -1, 1, 23);
  std::printf("\nSSD chunked vs Mamba-1 selective scan (batch 1, length %lld, d_inner %lld = %lld heads x %lld)\n",
              (long long)Lssd, (long long)D, (long long)H, (long long)P);
  std::printf("%6s %12s %14s %14s %12s %12s\n", "N", "scan ms", "SSD fp32 ms", "SSD bf16 ms", "fp32 speedup",
              "bf16 speedup");
  std::string ssd_json;
  for (int64_t N : {16, 64, 128, 256}) {
    const auto sa = scan_args(Lssd, N);
    const double scan_ms = time_ms([&] { check(cuda::selective_scan(sa, nullptr)); }, 1, 5);
    cpu::SsdArgs a;
    a.batch = 1, a.length = Lssd, a.heads = H, a.head_dim = P, a.state = N, a.groups = 1;
    a.x = u, a.dt = dt, a.A = Ah, a.B = Bm, a.C = Cm, a.D = Dh, a.z = z, a.dt_bias = dtb, a.dt_softplus = true;
    a.state_out = ssd_state, a.y = y;
    void* work = nullptr;
    CK(cudaMalloc(&work, cuda::ssd_chunked_workspace_bytes(a)));
    const double f32 = time_ms([&] { check(cuda::ssd_chunked(a, cuda::SsdMath::fp32, work, nullptr)); }, 1, 5);
    const double b16 = time_ms([&] { check(cuda::ssd_chunked(a, cuda::SsdMath::bf16_tensor, work, nullptr)); }, 1, 5);
    CK(cudaFree(work));
    std::printf("%6lld %12.3f %14.3f %14.3f %11.2fx %11.2fx\n", (long long)N, scan_ms, f32, b16, scan_ms / f32,
                scan_ms / b16);
    ssd_json += (ssd_json.empty() ? "" : ",") + std::string("{\"N\":") + std::to_string(N) + ",\"scan_ms\":" +
                std::to_string(scan_ms) + ",\"ssd_fp32_ms\":" + std::to_string(f32) + ",\"ssd_bf16_ms\":" +
                std::to_string(b16) + "}";
  }
  add_json("\"ssd_vs_scan\":[" + ssd_json + "]");

  // ---- 4 decode steps ---------------------------------------------------------------------------
  std::printf("\ndecode step, one layer's kernels only (no matmuls or norms); mean of 200 back-to-back launches\n");
  std::printf("%-34s %6s %12s\n", "kernel", "batch", "us");
  std::string dec_json;
  const int64_t conv1 = D, conv2 = D + 2 * 128, K = 4;
  float *cw = alloc(conv2 * K), *cb = alloc(conv2), *cstate = alloc(64 * (K - 1) * conv2), *cx = alloc(64 * conv2),
        *cy = alloc(64 * conv2);
  float *step_state = alloc(64 * D * 128);
  fill(cw, conv2 * K, -0.5f, 0.5f, 30);
  fill(cb, conv2, -0.5f, 0.5f, 31);
  fill(cstate, 64 * (K - 1) * conv2, -1, 1, 32);
  fill(cx, 64 * conv2, -1, 1, 33);
  fill(step_state, 64 * D * 128, -1, 1, 34);
  auto report = [&](const char* name, int64_t batch, double ms) {
    std::printf("%-34s %6lld %12.2f\n", name, (long long)batch, ms * 1e3);
    dec_json += (dec_json.empty() ? "" : ",") + std::string("{\"kernel\":\"") + name + "\",\"batch\":" +
                std::to_string(batch) + ",\"us\":" + std::to_string(ms * 1e3) + "}";
  };
  for (int64_t batch : {1, 64}) {
    report("mamba1 conv1d_step (1536, K4)", batch, time_ms([&] {
             check(cuda::conv1d_step(cx, cw, cb, cstate, cy, batch, conv1, K, true, nullptr));
           }, 10, 5, 200));
    cpu::SelectiveScanArgs s;
    s.batch = batch, s.length = 1, s.channels = D, s.state = 16, s.groups = 1;
    s.u = u, s.delta = delta, s.A = A, s.B = Bm, s.C = Cm, s.D = Dskip, s.z = z, s.delta_bias = bias;
    s.delta_softplus = true, s.state_in = step_state, s.state_out = step_state, s.y = y;
    report("mamba1 selective_state_update N16", batch,
           time_ms([&] { check(cuda::selective_state_update(s, nullptr)); }, 10, 5, 200));
    report("mamba2 conv1d_step (1792, K4)", batch, time_ms([&] {
             check(cuda::conv1d_step(cx, cw, cb, cstate, cy, batch, conv2, K, true, nullptr));
           }, 10, 5, 200));
    cpu::SsdArgs a;
    a.batch = batch, a.length = 1, a.heads = H, a.head_dim = P, a.state = 128, a.groups = 1;
    a.x = u, a.dt = dt, a.A = Ah, a.B = Bm, a.C = Cm, a.D = Dh, a.z = z, a.dt_bias = dtb, a.dt_softplus = true;
    a.state_in = step_state, a.state_out = step_state, a.y = y;
    report("mamba2 ssd_step 24x64 N128", batch, time_ms([&] { check(cuda::ssd_step(a, nullptr)); }, 10, 5, 200));
  }
  add_json("\"decode\":[" + dec_json + "]");

  // ---- 5 SSD training backward: recurrent against chunked -------------------------------------------
  const int64_t Ltr = 4096;
  std::printf("\nSSD training backward (batch 1, length %lld, %lld heads x %lld, chunk 64): recurrent vs chunked\n",
              (long long)Ltr, (long long)H, (long long)P);
  std::printf("%6s %14s %14s %14s %12s %12s\n", "N", "recurrent ms", "chunked fp32", "chunked bf16", "fp32 speedup",
              "bf16 speedup");
  std::string train_json;
  float *dx = alloc(Ltr * H * P), *ddt = alloc(Ltr * H), *dAh = alloc(H), *dDh = alloc(H), *dbh = alloc(H);
  float *dB = alloc(Ltr * Nmax), *dC = alloc(Ltr * Nmax), *yt = alloc(Ltr * H * P);
  float* boundary = alloc((Ltr / 64) * H * P * Nmax);
  for (int64_t N : {64, 128, 256}) {
    train::SsdTrainArgs a;
    a.batch = 1, a.length = Ltr, a.heads = H, a.head_dim = P, a.state = N, a.groups = 1, a.chunk = 64;
    train::SsdTrainTensors<float> t;
    t.x = u, t.dt = dt, t.A = Ah, t.B = Bm, t.C = Cm, t.D = Dh, t.dt_bias = dtb;
    check(cuda::ssd_train_forward(a, t, yt, boundary, nullptr));
    train::SsdTrainGrads<float> g;
    g.dx = dx, g.ddt = ddt, g.dA = dAh, g.dB = dB, g.dC = dC, g.dD = dDh, g.ddt_bias = dbh;
    void* work = nullptr;
    CK(cudaMalloc(&work, cuda::ssd_train_backward_workspace_bytes(a)));
    auto run = [&](cuda::SsdBackwardForm form, cuda::SsdMath math) {
      return time_ms([&] { check(cuda::ssd_train_backward(a, t, boundary, z, g, work, nullptr, form, math)); }, 1, 5);
    };
    const double rec = run(cuda::SsdBackwardForm::recurrent, cuda::SsdMath::fp32);
    const double f32 = run(cuda::SsdBackwardForm::chunked, cuda::SsdMath::fp32);
    const double b16 = run(cuda::SsdBackwardForm::chunked, cuda::SsdMath::bf16_tensor);
    CK(cudaFree(work));
    std::printf("%6lld %14.3f %14.3f %14.3f %11.2fx %11.2fx\n", (long long)N, rec, f32, b16, rec / f32, rec / b16);
    train_json += (train_json.empty() ? "" : ",") + std::string("{\"N\":") + std::to_string(N) +
                  ",\"recurrent_ms\":" + std::to_string(rec) + ",\"chunked_fp32_ms\":" + std::to_string(f32) +
                  ",\"chunked_bf16_ms\":" + std::to_string(b16) + "}";
  }
  add_json("\"ssd_train_backward\":[" + train_json + "]");
  CK(cudaDeviceSynchronize());
  std::printf("\nJSON {%s}\n", json.c_str());
  return 0;
}
