// A typed thin wrapper of the native model runner (native/napi/model.cpp): a model over weight
// tensors under the canonical names of ./config, a prefill (forward) and a decode step (step), each
// one native call off the event loop. Sizes are checked here with messages naming the argument; the
// native layer checks every byte length again.
//
// State layout (f32): conv [layers, batch, K-1, conv channels]; ssm Mamba-1 [layers, batch, d_inner, N],
// Mamba-2 [layers, batch, H, P, N]. Sequence b's state in layer l is one contiguous block, so a
// sequence is cut out of (or gathered into) a batch by copying `layers` blocks.
//
// Tensors passed in (weights, logits, states) must not be disposed while the model or a call that
// uses them is alive: the native side holds references that keep them from the garbage collector,
// but dispose() frees memory at once.
import { dtypeCode } from "../dtype";
import { native, NativeAddon } from "../native";
import { formatShape, Tensor } from "../tensor";
import { MambaConfig } from "./config";

type Args = Record<string, unknown>;

export interface NativeStateSizes {
  /** Floats of the conv / SSM state of the whole batch. */
  conv: number;
  ssm: number;
  convShape: number[];
  ssmShape: number[];
}

interface NativeModelAddon extends NativeAddon {
  modelCreate(args: Args): object;
  modelForward(args: Args): Promise<void>;
  modelStep(args: Args): Promise<void>;
  modelStateSizes(args: Args): NativeStateSizes;
  modelRelease(handle: object): void;
}

function addon(): NativeModelAddon {
  return native() as NativeModelAddon;
}

/** A native model: the configuration, the weights it reads, and the native handle. */
export interface NativeModel {
  readonly config: Readonly<MambaConfig>;
  /** The tensors the model reads (kept referenced here as well as natively). */
  readonly weights: ReadonlyMap<string, Tensor>;
  /** @internal */
  readonly handle: object;
}

interface ModelRecord extends NativeModel {
  released: boolean;
}

function live(model: NativeModel, what: string): ModelRecord {
  const record = model as ModelRecord;
  if (!record || typeof record.handle !== "object" || record.handle === null) {
    throw new Error(`${what}: model must come from createNativeModel()`);
  }
  if (record.released) throw new Error(`${what}: the model has been released`);
  return record;
}

/**
 * A native model over `weights` (canonical names, shapes as expectedShapes(config)). The weights are
 * read in place, not copied. Throws an Error naming a missing, misshapen or mistyped weight.
 */
export function createNativeModel(config: MambaConfig, weights: Map<string, Tensor>): NativeModel {
  const table: Record<string, { buffer: ArrayBuffer; dtype: number; shape: number[] }> = {};
  for (const [name, tensor] of weights) {
    if (!(tensor instanceof Tensor)) throw new Error(`createNativeModel: weight "${name}" is not a Tensor`);
    table[name] = { buffer: tensor.buffer(`weight "${name}"`), dtype: dtypeCode(tensor.dtype), shape: [...tensor.shape] };
  }
  const handle = addon().modelCreate({ config, weights: table });
  const record: ModelRecord = { config: Object.freeze({ ...config }), weights: new Map(weights), handle, released: false };
  return record;
}

/** Frees the native model (not the weights). Calls still running finish first. */
export function release(model: NativeModel): void {
  const record = model as ModelRecord;
  if (record.released) return;
  record.released = true;
  addon().modelRelease(record.handle);
}

/** State sizes of `batch` sequences: floats and shapes of the conv and SSM states. */
export function stateSizes(model: NativeModel, batch: number): NativeStateSizes {
  const record = live(model, "stateSizes");
  if (!Number.isSafeInteger(batch) || batch < 1) throw new Error(`stateSizes: batch must be an integer >= 1, got ${batch}`);
  return addon().modelStateSizes({ model: record.handle, batch });
}

/** Zero states for `batch` sequences (the state before any token). */
export function createStates(model: NativeModel, batch: number): { conv: Tensor; ssm: Tensor } {
  const sizes = stateSizes(model, batch);
  return { conv: Tensor.zeros(sizes.convShape), ssm: Tensor.zeros(sizes.ssmShape) };
}

export interface ForwardOptions {
  /** Token ids of every sequence, one sequence after another. */
  ids: Int32Array | readonly number[] | Tensor;
  /** Tokens in each sequence (each >= 1). Default: one sequence of all the ids. */
  lengths?: readonly number[];
  /** Logits only for the last token of each sequence: [sequences, vocab]. */
  lastOnly?: boolean;
  /**
   * Where the logits go (f32). lastOnly: [sequences, vocab]. Otherwise [Σ lengths, vocab] (rows as the
   * ids), or [sequences, P, vocab] with P >= the longest length (rows past a sequence's end are left
   * as they were). Allocated ([Σ lengths, vocab] or [sequences, vocab]) when absent.
   */
  logits?: Tensor;
  /** States [layers, sequences, …] (createStates): written with each sequence's final state. */
  convState?: Tensor;
  ssmState?: Tensor;
  /** Start from convState / ssmState instead of zeros. */
  useInitialState?: boolean;
}

function idBuffer(ids: Int32Array | readonly number[] | Tensor, what: string): { buffer: ArrayBuffer; count: number } {
  if (ids instanceof Tensor) {
    if (ids.dtype !== "i32") throw new Error(`${what}: ids must be an i32 tensor, got ${ids.dtype}`);
    return { buffer: ids.buffer(`${what}: ids`), count: ids.size };
  }
  if (!(ids instanceof Int32Array) && !Array.isArray(ids)) {
    throw new Error(`${what}: ids must be an Int32Array, a number[] or an i32 Tensor`);
  }
  const copy = new Int32Array(ids.length);
  for (let i = 0; i < ids.length; i++) {
    const v = ids[i];
    if (!Number.isInteger(v)) throw new Error(`${what}: token id ${v} at position ${i} is not an integer`);
    copy[i] = v;
  }
  return { buffer: copy.buffer as ArrayBuffer, count: copy.length };
}

function checkF32(tensor: Tensor, what: string, shapes: number[][]): void {
  if (!(tensor instanceof Tensor)) throw new Error(`${what} must be a Tensor`);
  if (tensor.dtype !== "f32") throw new Error(`${what} must be f32, got ${tensor.dtype}`);
  const fits = shapes.some((s) => s.length === tensor.shape.length && s.every((d, i) => d === tensor.shape[i]));
  if (!fits) {
    throw new Error(`${what}: expected shape ${shapes.map((s) => formatShape(s)).join(" or ")}, got ${formatShape(tensor.shape)}`);
  }
}

function checkStates(model: NativeModel, what: string, batch: number, conv: Tensor, ssm: Tensor): void {
  const sizes = stateSizes(model, batch);
  checkF32(conv, `${what}: convState`, [sizes.convShape]);
  checkF32(ssm, `${what}: ssmState`, [sizes.ssmShape]);
}

/**
 * A prefill: every layer over each sequence (one native call, off the event loop). Resolves to the
 * logits tensor (options.logits when given).
 */
export async function forward(model: NativeModel, options: ForwardOptions): Promise<Tensor> {
  const record = live(model, "forward");
  const vocab = record.config.vocabSize;
  const { buffer, count } = idBuffer(options.ids, "forward");
  const lengths = options.lengths ? [...options.lengths] : [count];
  if (lengths.length === 0) throw new Error("forward: lengths must hold at least one sequence");
  let total = 0;
  lengths.forEach((n, i) => {
    if (!Number.isSafeInteger(n) || n < 1) throw new Error(`forward: lengths[${i}] must be an integer >= 1, got ${n}`);
    total += n;
  });
  if (total !== count) throw new Error(`forward: lengths add up to ${total} tokens, ids hold ${count}`);
  const lastOnly = options.lastOnly ?? false;
  const longest = Math.max(...lengths);
  let logits = options.logits;
  let paddedLength: number | undefined;
  if (logits) {
    if (lastOnly) {
      checkF32(logits, "forward: logits", [[lengths.length, vocab]]);
    } else {
      checkF32(logits, "forward: logits", [[total, vocab], [lengths.length, logits.shape[1] ?? 0, vocab]]);
      if (logits.shape.length === 3) {
        paddedLength = logits.shape[1];
        if (paddedLength < longest) {
          throw new Error(`forward: logits ${formatShape(logits.shape)} are padded to ${paddedLength} positions, the longest sequence has ${longest}`);
        }
      }
    }
  } else {
    logits = Tensor.zeros(lastOnly ? [lengths.length, vocab] : [total, vocab]);
  }
  const useInitialState = options.useInitialState ?? false;
  if ((options.convState === undefined) !== (options.ssmState === undefined)) {
    throw new Error("forward: convState and ssmState go together: give both or neither");
  }
  if (useInitialState && !options.convState) throw new Error("forward: useInitialState needs convState and ssmState");
  if (options.convState && options.ssmState) {
    checkStates(model, "forward", lengths.length, options.convState, options.ssmState);
  }
  await addon().modelForward({
    model: record.handle,
    ids: buffer,
    lengths,
    lastOnly,
    logits: logits.buffer("forward: logits"),
    paddedLength,
    convState: options.convState?.buffer("forward: convState"),
    ssmState: options.ssmState?.buffer("forward: ssmState"),
    useInitialState,
  });
  return logits;
}

export interface StepOptions {
  /** One token for each sequence of the batch. */
  ids: Int32Array | readonly number[] | Tensor;
  /** The batch's states, updated in place. */
  convState: Tensor;
  ssmState: Tensor;
  /** [batch, vocab] f32; allocated when absent. */
  logits?: Tensor;
}

/** One decode step for a batch of sequences (one native call). Resolves to the logits [batch, vocab]. */
export async function step(model: NativeModel, options: StepOptions): Promise<Tensor> {
  const record = live(model, "step");
  const vocab = record.config.vocabSize;
  const { buffer, count } = idBuffer(options.ids, "step");
  if (count < 1) throw new Error("step: ids must hold at least one token");
  checkStates(model, "step", count, options.convState, options.ssmState);
  const logits = options.logits ?? Tensor.zeros([count, vocab]);
  if (options.logits) checkF32(logits, "step: logits", [[count, vocab]]);
  await addon().modelStep({
    model: record.handle,
    ids: buffer,
    batch: count,
    convState: options.convState.buffer("step: convState"),
    ssmState: options.ssmState.buffer("step: ssmState"),
    logits: logits.buffer("step: logits"),
  });
  return logits;
}
