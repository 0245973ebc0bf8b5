// The recurrent state of a batch of sequences: each layer's conv window and SSM state. Its size does
// not grow with the sequence, so a conversation can be cloned, saved and resumed cheaply.
import { MambaConfig, stateLayers } from "./config";
import { Tensor } from "../tensor";

const MAGIC = "MSSMSTATE1";

/**
 * The state's shapes for a batch: conv [layers, batch, K-1, channels], ssm [layers, batch, ...], where
 * layers counts the Mamba layers (mixture-of-experts blocks have no state).
 */
export function stateShapes(config: MambaConfig, batch: number): { conv: number[]; ssm: number[] } {
  const c = config;
  const m1 = c.architecture === "mamba1";
  const channels = m1 ? c.intermediateSize : c.intermediateSize + 2 * c.numGroups * c.stateSize;
  const layers = stateLayers(c);
  return {
    conv: [layers, batch, c.convKernel - 1, channels],
    ssm: m1 ? [layers, batch, c.intermediateSize, c.stateSize] : [layers, batch, c.numHeads, c.headDim, c.stateSize],
  };
}

/** What a saved state must agree on with the model that loads it. */
function fingerprint(config: MambaConfig) {
  const c = config;
  return {
    architecture: c.architecture,
    hiddenSize: c.hiddenSize,
    numLayers: c.numLayers,
    intermediateSize: c.intermediateSize,
    stateSize: c.stateSize,
    convKernel: c.convKernel,
    numHeads: c.numHeads,
    headDim: c.headDim,
    numGroups: c.numGroups,
    ...(c.moe ? { moeLayers: c.moe.layers } : {}),
  };
}

/** A state held by an accelerator (./cuda-model's CudaState), copied to and from the CPU layout. */
export interface DeviceState {
  readonly kind: "cuda";
  readonly batch: number;
  readonly disposed: boolean;
  read(conv: Tensor, ssm: Tensor): void;
  write(conv: Tensor, ssm: Tensor): void;
  clone(): DeviceState;
  dispose(): void;
}

/** Whether states of models with these configurations have the same layout (what save() records). */
export function sameStateLayout(a: MambaConfig, b: MambaConfig): boolean {
  return JSON.stringify(fingerprint(a)) === JSON.stringify(fingerprint(b));
}

export class ModelState {
  /** Tokens each sequence has consumed. */
  readonly positions: number[];
  #conv: Tensor | null;
  #ssm: Tensor | null;
  #device: DeviceState | null;

  /** @internal A state in host tensors (conv, ssm), or one held by a device (conv and ssm null). */
  constructor(
    readonly config: MambaConfig,
    readonly batch: number,
    conv: Tensor | null,
    ssm: Tensor | null,
    positions?: number[],
    device?: DeviceState,
  ) {
    this.#conv = conv;
    this.#ssm = ssm;
    this.#device = device ?? null;
    this.positions = positions ?? new Array(batch).fill(0);
  }

  static zeros(config: MambaConfig, batch: number): ModelState {
    if (!Number.isInteger(batch) || batch < 1) throw new Error(`createState: batch must be an integer >= 1, got ${batch}`);
    const s = stateShapes(config, batch);
    return new ModelState(config, batch, Tensor.zeros(s.conv), Tensor.zeros(s.ssm));
  }

  /** Where the state lives: "cpu" (host tensors) or "cuda" (the model's GPU). */
  get device(): "cpu" | "cuda" {
    return this.#device ? this.#device.kind : "cpu";
  }

  /** The conv states [layers, batch, K-1, channels] (host states only; toCpu() copies a device state). */
  get conv(): Tensor {
    return this.#host("conv").conv;
  }

  /** The SSM states [layers, batch, ...] (host states only; toCpu() copies a device state). */
  get ssm(): Tensor {
    return this.#host("ssm").ssm;
  }

  /** Bytes the state takes (conv and SSM states, f32). */
  get byteLength(): number {
    const s = stateShapes(this.config, this.batch);
    return (s.conv.reduce((a, b) => a * b, 1) + s.ssm.reduce((a, b) => a * b, 1)) * 4;
  }

  #host(what: string): { conv: Tensor; ssm: Tensor } {
    if (this.#device) {
      throw new Error(`state.${what}: the state lives on the GPU (device "${this.#device.kind}"); state.toCpu() copies it into host tensors`);
    }
    return { conv: this.#conv!, ssm: this.#ssm! };
  }

  /** @internal The device's state, for the model's calls (null for a host state). */
  get deviceState(): DeviceState | null {
    return this.#device;
  }

  /** The state in host tensors: a copy (a device state is copied from the device). */
  toCpu(): ModelState {
    if (!this.#device) return this.clone();
    const s = stateShapes(this.config, this.batch);
    const conv = Tensor.zeros(s.conv);
    const ssm = Tensor.zeros(s.ssm);
    try {
      this.#device.read(conv, ssm);
    } catch (e) {
      conv.dispose();
      ssm.dispose();
      throw e;
    }
    return new ModelState(this.config, this.batch, conv, ssm, [...this.positions]);
  }

  /** An independent copy on the same device. */
  clone(): ModelState {
    if (this.#device) return new ModelState(this.config, this.batch, null, null, [...this.positions], this.#device.clone());
    const { conv, ssm } = this.#host("clone");
    return new ModelState(this.config, this.batch, conv.clone(), ssm.clone(), [...this.positions]);
  }

  /** The state as bytes: a header naming the model's sizes, then the f32 conv and SSM states. */
  save(): Buffer {
    if (this.#device) {
      const host = this.toCpu();
      try {
        return host.save();
      } finally {
        host.dispose();
      }
    }
    const { conv, ssm } = this.#host("save");
    const header = Buffer.from(
      JSON.stringify({ format: MAGIC, model: fingerprint(this.config), batch: this.batch, positions: this.positions }),
      "utf8",
    );
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    return Buffer.concat([Buffer.from(MAGIC, "ascii"), length, header, Buffer.from(conv.bytes()), Buffer.from(ssm.bytes())]);
  }

  /** Reads a state written by save(); its sizes must match the model's. */
  static load(config: MambaConfig, data: Uint8Array): ModelState {
    const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const fail = (why: string): never => {
      throw new Error(`loadState: ${why}`);
    };
    if (buf.length < MAGIC.length + 4 || buf.toString("ascii", 0, MAGIC.length) !== MAGIC) {
      fail("not a mamba-ssm state (bad magic)");
    }
    const headerLength = buf.readUInt32LE(MAGIC.length);
    const start = MAGIC.length + 4;
    if (start + headerLength > buf.length) fail(`header of ${headerLength} bytes runs past the ${buf.length} bytes given`);
    let header: { model: Record<string, unknown>; batch: number; positions: number[] };
    try {
      header = JSON.parse(buf.toString("utf8", start, start + headerLength));
    } catch (e) {
      return fail(`unreadable header (${(e as Error).message})`);
    }
    const want = fingerprint(config) as Record<string, unknown>;
    for (const [key, value] of Object.entries(want)) {
      // By value: moeLayers is an array, which JSON gives back as a new one.
      if (JSON.stringify(header.model?.[key]) !== JSON.stringify(value)) {
        fail(`the state was saved by a model with ${key} = ${JSON.stringify(header.model?.[key])}, this model has ${JSON.stringify(value)}`);
      }
    }
    const batch = header.batch;
    if (!Number.isInteger(batch) || batch < 1) fail(`bad batch ${batch}`);
    const shapes = stateShapes(config, batch);
    const convBytes = shapes.conv.reduce((a, b) => a * b, 1) * 4;
    const ssmBytes = shapes.ssm.reduce((a, b) => a * b, 1) * 4;
    const dataStart = start + headerLength;
    if (buf.length !== dataStart + convBytes + ssmBytes) {
      fail(`expected ${convBytes + ssmBytes} bytes of state after the header, found ${buf.length - dataStart}`);
    }
    const conv = Tensor.fromBytes(buf.subarray(dataStart, dataStart + convBytes), "f32", shapes.conv);
    const ssm = Tensor.fromBytes(buf.subarray(dataStart + convBytes), "f32", shapes.ssm);
    const positions = Array.isArray(header.positions) && header.positions.length === batch ? header.positions : undefined;
    return new ModelState(config, batch, conv, ssm, positions);
  }

  dispose(): void {
    if (this.#device) {
      this.#device.dispose();
      return;
    }
    this.#conv!.dispose();
    this.#ssm!.dispose();
  }

  get disposed(): boolean {
    return this.#device ? this.#device.disposed : this.#conv!.disposed;
  }
}
