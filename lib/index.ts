// mamba-ssm: Mamba selective state-space models in Node.js.
export { Tensor, shapeSize, formatShape } from "./tensor";
export type { Shape } from "./tensor";
export type { DType } from "./dtype";
export { DTYPES } from "./dtype";
export * as ops from "./ops";
export { cpuInfo, setCpuLevel, getThreads, setThreads } from "./runtime";
export type { CpuInfo, CpuLevel } from "./runtime";
export { version } from "./version";
export { loadModel, MambaModel } from "./models/model";
export type { LoadModelOptions, GenerateOptions, GenerationChunk, GenerationStats, Completion, FinishReason } from "./models/model";
export { ModelState } from "./models/state";
export type { MambaConfig, Architecture } from "./models/config";
export { initWeights, preset } from "./models/init";
export { loadCheckpoint, saveCheckpoint } from "./io/checkpoint";
export { ByteTokenizer, StreamDecoder, loadTokenizerFor, loadTokenizerJson, tokenizerFromGguf } from "./tokenizers";
export type { Tokenizer } from "./tokenizers";
