// The functions each level defines, declared inside mssm::cpu::MSSM_LEVEL (see level.h).
#pragma once
#include "kernels.h"

namespace mssm::cpu::MSSM_LEVEL {
void matmul(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N, int64_t K);
void matmul_step(const float* x, const void* w, DType w_dtype, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K);
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);
void rmsnorm(const float* x, const float* residual, const float* weight, float* out, float* residual_out, int64_t rows,
             int64_t dim, float eps);
void gated_rmsnorm(const float* x, const float* z, const float* weight, float* out, int64_t rows, int64_t dim,
                   int64_t group_size, float eps, bool norm_before_gate);
void embedding(const void* table, DType dtype, const int32_t* ids, float* out, int64_t count, int64_t dim);
void conv1d(const float* x, const float* w, const float* bias, const float* state_in, float* state_out, float* y,
            int64_t batch, int64_t length, int64_t channels, int64_t kernel, bool silu);
void conv1d_step(const float* x, const float* w, const float* bias, float* state, float* y, int64_t batch,
                 int64_t channels, int64_t kernel, bool silu);
void selective_scan(const SelectiveScanArgs& args);
void selective_state_update(const SelectiveScanArgs& args);
void ssd_chunked(const SsdArgs& args);
void ssd_step(const SsdArgs& args);
void moe_route(const float* logits, int64_t tokens, int64_t experts, int64_t top_k, MoeScoring scoring,
               bool renormalize, float* weights, int32_t* indices, int32_t* counts);
void moe_experts(const MoeExpertsArgs& args);
void argmax(const float* logits, int64_t rows, int64_t vocab, int32_t* out);
int32_t sample(const float* logits, int64_t vocab, const SamplingParams& params, float u, float* scratch);
double fma_peak(int64_t iterations);
double bf16_peak(int64_t iterations);
double read_sum(const float* data, int64_t n);
}  // namespace mssm::cpu::MSSM_LEVEL
