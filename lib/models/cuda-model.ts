// A typed thin wrapper of the CUDA model runner's bindings (native/napi/cuda.cpp): a model whose
// weights live on an NVIDIA GPU, states that live there too, and a prefill (forward) or a decode step
// (step) as one native call each, off the event loop. Ids and logits are host tensors; states are
// device memory, copied to and from host tensors in the CPU runner's layout (./state).
//
// Only an addon built with the CUDA backend (`npm run build:cuda` where nvcc is found) has the model
// functions; cudaInfo() says, in every build, whether the backend is there and a device is usable.
import { dtypeCode } from "../dtype";
import { native, NativeAddon } from "../native";
import { Tensor } from "../tensor";
import { MambaConfig } from "./config";
import type { DeviceState } from "./state";

type Args = Record<string, unknown>;

/** The array's own ArrayBuffer (a copy when the array is a view into a larger one). */
function ownBuffer(v: Int32Array | Float32Array): ArrayBuffer {
  const exact = v.byteOffset === 0 && v.byteLength === v.buffer.byteLength;
  return (exact ? v : v.slice()).buffer as ArrayBuffer;
}

export interface CudaDevice {
  index: number;
  name: string;
  /** "9.0" for Hopper, "8.0" / "8.6" / "8.9" for Ampere and Ada. */
  computeCapability: string;
  memoryBytes: number;
}

export interface CudaInfo {
  /** Whether this addon was built with the CUDA backend. */
  built: boolean;
  /** Whether the backend links cuBLAS (prefill GEMMs on tensor cores). */
  cublas: boolean;
  /** The devices found (none without a GPU or a driver). */
  devices: CudaDevice[];
  /** Why no device can be used ("" when one can). */
  error: string;
}

interface CudaAddon extends NativeAddon {
  cudaInfo(): CudaInfo;
  cudaModelCreate?(args: Args): object;
  cudaModelInfo?(args: Args): { device: number; weightBytes: number; weightDType: string; cublas: boolean };
  cudaModelForward?(args: Args): Promise<void>;
  cudaModelStep?(args: Args): Promise<void>;
  cudaModelRelease?(handle: object): void;
  cudaStateCreate?(args: Args): object;
  cudaStateRead?(args: Args): void;
  cudaStateWrite?(args: Args): void;
  cudaStateCopy?(args: Args): void;
  cudaStateRelease?(handle: object): void;
}

function addon(): CudaAddon {
  return native() as CudaAddon;
}

/** Whether the CUDA backend is built in, the devices it sees, and why none can be used when so. */
export function cudaInfo(): CudaInfo {
  const info = addon().cudaInfo;
  if (typeof info !== "function") {
    return { built: false, cublas: false, devices: [], error: "the loaded addon predates the CUDA bindings; rebuild it" };
  }
  return info();
}

/** Throws an Error saying why `what` cannot run on CUDA device `device`; returns the addon's functions when it can. */
export function cudaUsable(what: string, device: number): Required<CudaAddon> {
  const info = cudaInfo();
  if (!info.built) throw new Error(`${what}: device "cuda" is not available: ${info.error}`);
  if (info.devices.length === 0) throw new Error(`${what}: device "cuda" needs an NVIDIA GPU and its driver: ${info.error}`);
  if (!info.devices.some((d) => d.index === device)) {
    throw new Error(`${what}: CUDA device ${device} does not exist (${info.devices.length} present)`);
  }
  return addon() as Required<CudaAddon>;
}

export type CudaWeightDType = "bf16" | "f32";

export interface CudaModel {
  readonly config: Readonly<MambaConfig>;
  readonly device: number;
  /** How the matrices are stored on the device. */
  readonly weightDType: CudaWeightDType;
  /** Bytes of weights on the device. */
  readonly weightBytes: number;
  /** Whether the prefill's large GEMMs use cuBLAS. */
  readonly cublas: boolean;
  /** @internal */
  readonly handle: object;
}

interface CudaModelRecord extends CudaModel {
  released: boolean;
}

function live(model: CudaModel, what: string): CudaModelRecord {
  const record = model as CudaModelRecord;
  if (!record || typeof record.handle !== "object" || record.handle === null) {
    throw new Error(`${what}: model must come from createCudaModel()`);
  }
  if (record.released) throw new Error(`${what}: the model has been released`);
  return record;
}

/**
 * Uploads a model (weights under the canonical names of ./config) to CUDA device `device`: matrices
 * as bf16 (default) or f32, vectors as f32. The host tensors are read during the call and not kept.
 * Throws an Error naming the cause when there is no CUDA backend, device or driver, and for a missing,
 * misshapen or mistyped weight.
 */
export function createCudaModel(
  config: MambaConfig,
  weights: ReadonlyMap<string, Tensor>,
  options: { weightDType?: CudaWeightDType; device?: number } = {},
): CudaModel {
  const device = options.device ?? 0;
  if (!Number.isSafeInteger(device) || device < 0) throw new Error(`createCudaModel: device must be an integer >= 0, got ${device}`);
  const weightDType = options.weightDType ?? "bf16";
  if (weightDType !== "bf16" && weightDType !== "f32") {
    throw new Error(`createCudaModel: weightDType must be "bf16" or "f32", got ${JSON.stringify(weightDType)}`);
  }
  const native = cudaUsable("createCudaModel", device);
  const table: Record<string, { buffer: ArrayBuffer; dtype: number; shape: number[] }> = {};
  for (const [name, tensor] of weights) {
    if (!(tensor instanceof Tensor)) throw new Error(`createCudaModel: weight "${name}" is not a Tensor`);
    table[name] = { buffer: tensor.buffer(`weight "${name}"`), dtype: dtypeCode(tensor.dtype), shape: [...tensor.shape] };
  }
  const handle = native.cudaModelCreate({ config, weights: table, weightDType, device });
  const info = native.cudaModelInfo({ model: handle });
  const record: CudaModelRecord = {
    config: Object.freeze({ ...config }),
    device,
    weightDType,
    weightBytes: info.weightBytes,
    cublas: info.cublas,
    handle,
    released: false,
  };
  return record;
}

/** Frees the model's device memory. Calls still running finish first. */
export function releaseCudaModel(model: CudaModel): void {
  const record = model as CudaModelRecord;
  if (record.released) return;
  record.released = true;
  (addon() as Required<CudaAddon>).cudaModelRelease(record.handle);
}

/**
 * A recurrent state of `batch` sequences in device memory (the conv and SSM states of every layer).
 * read(), write() and clone() are synchronous copies: they wait for a prefill or step that is using
 * the state to finish (the JavaScript thread blocks for that long).
 */
export class CudaState implements DeviceState {
  readonly kind = "cuda";
  #handle: object | null;
  readonly #model: CudaModel;

  private constructor(model: CudaModel, readonly batch: number, handle: object) {
    this.#model = model;
    this.#handle = handle;
  }

  /** A zero state on the model's device. */
  static create(model: CudaModel, batch: number): CudaState {
    const record = live(model, "createState");
    if (!Number.isSafeInteger(batch) || batch < 1) throw new Error(`createState: batch must be an integer >= 1, got ${batch}`);
    const handle = (addon() as Required<CudaAddon>).cudaStateCreate({ model: record.handle, batch });
    return new CudaState(model, batch, handle);
  }

  /** @internal The native handle, for the model's calls. */
  handle(what: string): object {
    if (!this.#handle) throw new Error(`${what}: the state has been disposed`);
    return this.#handle;
  }

  /** Whether the state was made for `model` (its device and sizes). */
  belongsTo(model: CudaModel): boolean {
    return this.#model === model;
  }

  get disposed(): boolean {
    return this.#handle === null;
  }

  /** Copies the device state into host tensors of the CPU layout (f32 [layers, batch, ...]). */
  read(conv: Tensor, ssm: Tensor): void {
    (addon() as Required<CudaAddon>).cudaStateRead({
      state: this.handle("state.read"), conv: conv.buffer("state conv"), ssm: ssm.buffer("state ssm"),
    });
  }

  /** Copies host tensors of the CPU layout into the device state. */
  write(conv: Tensor, ssm: Tensor): void {
    (addon() as Required<CudaAddon>).cudaStateWrite({
      state: this.handle("state.write"), conv: conv.buffer("state conv"), ssm: ssm.buffer("state ssm"),
    });
  }

  /** A copy on the same device. */
  clone(): CudaState {
    const copy = CudaState.create(this.#model, this.batch);
    (addon() as Required<CudaAddon>).cudaStateCopy({ from: this.handle("state.clone"), to: copy.handle("state.clone") });
    return copy;
  }

  dispose(): void {
    if (!this.#handle) return;
    (addon() as Required<CudaAddon>).cudaStateRelease(this.#handle);
    this.#handle = null;
  }
}

/**
 * A prefill of whole sequences (`lengths` of the flat `ids`): logits into `logits` (host f32; last
 * token of each sequence [sequences, vocab] with lastOnly, else [Σ lengths, vocab]). With a state
 * (batch = sequences) each sequence's final state is written there, and read first with useInitialState.
 */
export async function cudaForward(
  model: CudaModel,
  options: {
    ids: Int32Array;
    lengths: readonly number[];
    lastOnly: boolean;
    logits: Tensor;
    /** Logits [sequences, paddedLength, vocab]: each sequence's rows from s · paddedLength (the rest untouched). */
    paddedLength?: number;
    state?: CudaState;
    useInitialState?: boolean;
  },
): Promise<Tensor> {
  const record = live(model, "forward");
  await (addon() as Required<CudaAddon>).cudaModelForward({
    model: record.handle,
    ids: ownBuffer(options.ids),
    lengths: [...options.lengths],
    lastOnly: options.lastOnly,
    logits: options.logits.buffer("forward: logits"),
    paddedLength: options.paddedLength,
    state: options.state?.handle("forward"),
    useInitialState: options.useInitialState ?? false,
  });
  return options.logits;
}

/** One decode step: one token per sequence of the state's batch; logits [batch, vocab] into `logits`. */
export async function cudaStep(model: CudaModel, options: { ids: Int32Array; state: CudaState; logits: Tensor }): Promise<Tensor> {
  const record = live(model, "step");
  await (addon() as Required<CudaAddon>).cudaModelStep({
    model: record.handle,
    ids: ownBuffer(options.ids),
    state: options.state.handle("step"),
    logits: options.logits.buffer("step: logits"),
  });
  return options.logits;
}

/** The sampler's numbers for a sampling step (lib/ops/sampling.ts's DeviceDraw): one row per sequence. */
export interface CudaSampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  /** [batch][penaltyCount] tokens the repetition penalty applies to, or null. */
  penaltyTokens: Int32Array | null;
  penaltyCount: number;
  /** One uniform draw in [0, 1) per sequence. */
  draws: Float32Array;
}

/**
 * One decode step that also draws the next token of each sequence on the device (the CPU sampler's
 * rules with the given draws): only the tokens [batch] come back, the logits stay on the GPU.
 */
export async function cudaStepSample(model: CudaModel, options: { ids: Int32Array; state: CudaState; sampling: CudaSampling }): Promise<Int32Array> {
  const record = live(model, "step");
  const s = options.sampling;
  const tokens = new Int32Array(options.ids.length);
  await (addon() as Required<CudaAddon>).cudaModelStep({
    model: record.handle,
    ids: ownBuffer(options.ids),
    state: options.state.handle("step"),
    tokens: tokens.buffer,
    draws: ownBuffer(s.draws),
    temperature: s.temperature,
    topK: s.topK,
    topP: s.topP,
    minP: s.minP,
    repetitionPenalty: s.repetitionPenalty,
    penaltyTokens: s.penaltyTokens ? ownBuffer(s.penaltyTokens) : null,
    penaltyCount: s.penaltyCount,
  });
  return tokens;
}
