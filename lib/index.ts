// mamba-ssm: Mamba selective state-space models in Node.js.
export { Tensor, shapeSize, formatShape } from "./tensor";
export type { Shape } from "./tensor";
export type { DType } from "./dtype";
export { DTYPES } from "./dtype";
export * as ops from "./ops";
export { cpuInfo, setCpuLevel, getThreads, setThreads } from "./runtime";
export type { CpuInfo, CpuLevel } from "./runtime";
export { version } from "./version";
