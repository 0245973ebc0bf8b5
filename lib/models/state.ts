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

export class ModelState {
  /** Tokens each sequence has consumed. */
  readonly positions: number[];

  /** @internal */
  constructor(
    readonly config: MambaConfig,
    readonly batch: number,
    readonly conv: Tensor,
    readonly ssm: Tensor,
    positions?: number[],
  ) {
    this.positions = positions ?? new Array(batch).fill(0);
  }

  static zeros(config: MambaConfig, batch: number): ModelState {
    if (!Number.isInteger(batch) || batch < 1) throw new Error(`createState: batch must be an integer >= 1, got ${batch}`);
    const s = stateShapes(config, batch);
    return new ModelState(config, batch, Tensor.zeros(s.conv), Tensor.zeros(s.ssm));
  }

  clone(): ModelState {
    return new ModelState(this.config, this.batch, this.conv.clone(), this.ssm.clone(), [...this.positions]);
  }

  /** The state as bytes: a header naming the model's sizes, then the f32 conv and SSM states. */
  save(): Buffer {
    const header = Buffer.from(
      JSON.stringify({ format: MAGIC, model: fingerprint(this.config), batch: this.batch, positions: this.positions }),
      "utf8",
    );
    const length = Buffer.alloc(4);
    length.writeUInt32LE(header.length);
    return Buffer.concat([Buffer.from(MAGIC, "ascii"), length, header, Buffer.from(this.conv.bytes()), Buffer.from(this.ssm.bytes())]);
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
      if (header.model?.[key] !== value) {
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
    this.conv.dispose();
    this.ssm.dispose();
  }

  get disposed(): boolean {
    return this.conv.disposed;
  }
}
