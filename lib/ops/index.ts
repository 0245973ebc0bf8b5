// Every CPU kernel, callable from TypeScript with shape and dtype validation.
export { matmul, split } from "./linear";
export { rmsnorm, addRmsnorm, gatedRmsnorm, embedding } from "./norm";
export type { GatedRmsnormOptions } from "./norm";
export { conv1d, conv1dStep } from "./conv";
export type { Conv1dOptions } from "./conv";
export { selectiveScan, selectiveStateUpdate } from "./scan";
export type { SelectiveScanInputs, SelectiveStateUpdateInputs } from "./scan";
export { ssdChunked, ssdStep } from "./ssd";
export type { SsdInputs, SsdStepInputs } from "./ssd";
export { moeRoute, moeExperts, moe } from "./moe";
export type { MoeRouteOptions, MoeRouting, MoeExpertWeights, MoeOptions, MoeScoring, Activation } from "./moe";
export { argmax, sample, Sampler } from "./sampling";
export type { SamplingOptions } from "./sampling";
