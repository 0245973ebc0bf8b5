// A typed wrapper of the native trainer (native/napi/train.cpp): the parameters, gradients and AdamW
// moments of one model in native memory, a micro-batch's forward and backward as one native call off
// the event loop, and the optimizer step.
//
// The trainer learns A through A_log (A = -exp(A_log)), as the reference implementation does; its
// parameter "layers.{i}.A_log" stands for the canonical weight "layers.{i}.A". loadWeights() and
// weights() convert between the two, so the rest of the library only sees canonical weights.
import { native, NativeAddon } from "../native";
import { Tensor } from "../tensor";
import { expectedShapes, MambaConfig } from "../models/config";

type Args = Record<string, unknown>;

/** One parameter tensor inside the trainer's single f32 buffer. */
export interface ParameterSlot {
  name: string;
  shape: number[];
  offset: number;
  count: number;
  /** AdamW's weight decay applies (matrices and the conv). */
  decay: boolean;
}

interface TrainerLayout {
  slots: ParameterSlot[];
  floats: number;
  step: number;
  activationFloatsPerToken: number;
  workingFloatsPerToken: number;
}

interface TrainerAddon extends NativeAddon {
  trainerCreate(args: Args): object;
  trainerSlots(args: Args): TrainerLayout;
  trainerRead(args: Args): void;
  trainerWrite(args: Args): void;
  trainerForwardBackward(args: Args): Promise<MicroBatchLoss>;
  trainerStep(args: Args): { gradNorm: number; step: number };
  trainerZeroGrads(args: Args): void;
  trainerRelease(args: Args): void;
}

function addon(): TrainerAddon {
  return native() as TrainerAddon;
}

export type TrainerBuffer = "params" | "grads" | "m" | "v";

export interface AdamWOptions {
  lr: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  weightDecay?: number;
  /** Global gradient-norm clipping (0: none). */
  maxGradNorm?: number;
}

export interface MicroBatchLoss {
  /** Σ of the token losses (nats). */
  sum: number;
  /** Tokens with a target. */
  count: number;
  /** Σ over the mixture-of-experts blocks of their load-balancing losses (0 without MoE blocks). */
  aux: number;
}

export interface TrainerOptions {
  /** Tokens between the scan states kept for the backward (Mamba-2: the SSD chunk length). Default 64. */
  scanChunk?: number;
  /** Weight of the MoE blocks' load-balancing loss in the objective (default 0.01). */
  auxWeight?: number;
}

export class Trainer {
  readonly config: Readonly<MambaConfig>;
  readonly slots: readonly ParameterSlot[];
  /** Floats in each of the four buffers. */
  readonly floats: number;
  /** Floats the forward keeps per token for the backward (all layers; the scan's chunk-boundary states aside). */
  readonly activationFloatsPerToken: number;
  /** Floats per token of the buffers the backward works in (one layer at a time). */
  readonly workingFloatsPerToken: number;
  #handle: object | null;
  #step: number;

  constructor(config: MambaConfig, options: TrainerOptions = {}) {
    this.config = Object.freeze({ ...config });
    this.#handle = addon().trainerCreate({ config, scanChunk: options.scanChunk, auxWeight: options.auxWeight });
    const layout = addon().trainerSlots({ trainer: this.#handle });
    this.slots = layout.slots;
    this.floats = layout.floats;
    this.activationFloatsPerToken = layout.activationFloatsPerToken;
    this.workingFloatsPerToken = layout.workingFloatsPerToken;
    this.#step = layout.step;
  }

  #live(): object {
    if (!this.#handle) throw new Error("Trainer: the trainer has been disposed");
    return this.#handle;
  }

  /** Optimizer steps taken. */
  get step(): number {
    return this.#step;
  }

  /** Number of trained values (a tied head counted once). */
  get parameterCount(): number {
    return this.slots.reduce((n, s) => n + s.count, 0);
  }

  /** A copy of one of the trainer's buffers (layout: `slots`). */
  read(which: TrainerBuffer): Float32Array {
    const out = new Float32Array(this.floats);
    addon().trainerRead({ trainer: this.#live(), which, out: out.buffer });
    return out;
  }

  /** Replaces one of the trainer's buffers; `step` sets the optimizer's step count (resuming). */
  write(which: TrainerBuffer, data: Float32Array, step?: number): void {
    if (!(data instanceof Float32Array) || data.length !== this.floats) {
      throw new Error(`Trainer.write: ${which} must be a Float32Array of ${this.floats} values`);
    }
    const copy = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength ? data : data.slice();
    addon().trainerWrite({ trainer: this.#live(), which, data: copy.buffer, step });
    if (step !== undefined) this.#step = step;
  }

  /** The buffer `which` as named tensors (views into one copy), under the trainer's names. */
  tensors(which: TrainerBuffer): Map<string, Float32Array> {
    const all = this.read(which);
    const out = new Map<string, Float32Array>();
    for (const s of this.slots) out.set(s.name, all.subarray(s.offset, s.offset + s.count));
    return out;
  }

  /** Sets the parameters from canonical f32-convertible weights (A is turned into A_log = log(-A)). */
  loadWeights(weights: ReadonlyMap<string, Tensor>): void {
    const expected = expectedShapes(this.config as MambaConfig);
    const params = new Float32Array(this.floats);
    for (const s of this.slots) {
      const canonical = s.name.endsWith(".A_log") ? s.name.slice(0, -4) : s.name;
      const t = weights.get(canonical);
      if (!t) throw new Error(`Trainer.loadWeights: weight "${canonical}" is missing`);
      const shape = expected.get(canonical)!;
      if (t.shape.length !== shape.length || t.shape.some((v, i) => v !== shape[i])) {
        throw new Error(`Trainer.loadWeights: weight "${canonical}" has shape [${t.shape}], expected [${shape}]`);
      }
      const f32 = t.dtype === "f32" ? t : t.to("f32");
      const values = f32.data as Float32Array;
      const dst = params.subarray(s.offset, s.offset + s.count);
      if (s.name.endsWith(".A_log")) {
        for (let i = 0; i < s.count; i++) {
          if (!(values[i] < 0)) {
            throw new Error(`Trainer.loadWeights: "${canonical}" must be negative (A = -exp(A_log)); element ${i} is ${values[i]}`);
          }
          dst[i] = Math.log(-values[i]);
        }
      } else {
        dst.set(values);
      }
      if (f32 !== t) f32.dispose();
    }
    this.write("params", params);
  }

  /** The current parameters as canonical f32 weights (A = -exp(A_log)), fresh tensors the caller owns. */
  weights(): Map<string, Tensor> {
    const params = this.read("params");
    const out = new Map<string, Tensor>();
    for (const s of this.slots) {
      const values = params.slice(s.offset, s.offset + s.count);
      if (s.name.endsWith(".A_log")) {
        for (let i = 0; i < values.length; i++) values[i] = -Math.exp(values[i]);
        out.set(s.name.slice(0, -4), Tensor.from(values, s.shape));
      } else {
        out.set(s.name, Tensor.from(values, s.shape));
      }
    }
    return out;
  }

  /**
   * Runs `batch` sequences of `length` tokens (ids, targets: [batch, length]; a target < 0 is
   * ignored) from zero states and returns the summed loss. With `backward` (the default) it adds
   * lossScale · d(Σ losses)/dθ to the gradients; with MoE blocks the objective also holds
   * count · auxWeight · aux, so that with lossScale = 1 / count it is the mean loss plus auxWeight
   * times the load-balancing losses.
   */
  async forwardBackward(
    ids: Int32Array,
    targets: Int32Array,
    batch: number,
    length: number,
    options: { backward?: boolean; lossScale?: number } = {},
  ): Promise<MicroBatchLoss> {
    return addon().trainerForwardBackward({
      trainer: this.#live(),
      ids,
      targets,
      batch,
      length,
      backward: options.backward ?? true,
      lossScale: options.lossScale ?? 1,
    });
  }

  /** Clips the gradients, takes one AdamW step and zeroes the gradients. Returns the norm before clipping. */
  optimizerStep(options: AdamWOptions): { gradNorm: number; step: number } {
    const r = addon().trainerStep({ trainer: this.#live(), ...options });
    this.#step = r.step;
    return r;
  }

  zeroGrads(): void {
    addon().trainerZeroGrads({ trainer: this.#live() });
  }

  dispose(): void {
    if (!this.#handle) return;
    addon().trainerRelease({ trainer: this.#handle });
    this.#handle = null;
  }
}
