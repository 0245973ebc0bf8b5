// STUB: the native model runner (filled in by the model-runner work).
namespace mssm::model {}
