// Compiled once per level: that level's functions gathered into its KernelTable.
#include "level.h"

#define MSSM_STR2(x) #x
#define MSSM_STR(x) MSSM_STR2(x)

namespace mssm::cpu::MSSM_LEVEL {
extern const KernelTable table;
const KernelTable table = {
    MSSM_STR(MSSM_LEVEL),
    &matmul,
    &matmul_step,
    &convert,
    &rmsnorm,
    &gated_rmsnorm,
    &embedding,
    &conv1d,
    &conv1d_step,
    &selective_scan,
    &selective_state_update,
    &ssd_chunked,
    &ssd_step,
    &moe_route,
    &moe_experts,
    &argmax,
    &sample,
    &fma_peak,
    &bf16_peak,
    &read_sum,
};
}  // namespace mssm::cpu::MSSM_LEVEL
// Every member must be filled: a table one entry short fails here.
static_assert(sizeof(mssm::cpu::KernelTable) == 20 * sizeof(void*), "KernelTable and table.cpp disagree");
