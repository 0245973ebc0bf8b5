// STUB: memory-mapped checkpoint files (filled in by the checkpoint-loading work).
#include "args.h"

namespace mssm::napi {
void register_mapfile(Napi::Env env, Napi::Object exports) {
  (void)env;
  (void)exports;
}
}  // namespace mssm::napi
