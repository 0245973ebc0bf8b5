// STUB: bindings of the native model runner (filled in by the model-runner work).
#include "args.h"

namespace mssm::napi {
void register_model(Napi::Env env, Napi::Object exports) {
  (void)env;
  (void)exports;
}
}  // namespace mssm::napi
