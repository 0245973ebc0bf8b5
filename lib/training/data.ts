// Byte-level training data: a text file's bytes split into a training part and a held-out
// validation part, a seeded sampler of random training windows that a resumed run can continue
// exactly, and the fixed windows an evaluation walks through.
//
// Shapes: B = batch (windows per draw), L = length (bytes the model reads per window). A window is
// L + 1 consecutive bytes; the model reads the first L and predicts the last L.
import * as fs from "fs";

export const DEFAULT_VALIDATION_FRACTION = 0.05;

export interface ByteDatasetOptions {
  /** The share of the bytes, taken from the end, held out for validation: in [0, 0.5], 0.05 by default. */
  validationFraction?: number;
  /** How the data is named in messages (the file's path for fromFile). */
  source?: string;
}

export class ByteDataset {
  /** The bytes a model trains on: all but the last validationFraction of the data. */
  readonly train: Uint8Array;
  /** The held-out tail of the data. */
  readonly validation: Uint8Array;
  /** Where the bytes came from, for messages and logs. */
  readonly source: string;

  private constructor(train: Uint8Array, validation: Uint8Array, source: string) {
    this.train = train;
    this.validation = validation;
    this.source = source;
  }

  /** Reads a whole file as bytes and splits it. */
  static fromFile(path: string, options: Omit<ByteDatasetOptions, "source"> = {}): ByteDataset {
    let bytes: Uint8Array;
    try {
      bytes = fs.readFileSync(path);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      const why = code === "ENOENT" ? "no such file" : code === "EISDIR" ? "it is a folder" : (err as Error).message;
      throw new Error(`cannot read training data ${path}: ${why}`);
    }
    return ByteDataset.fromBytes(bytes, { ...options, source: path });
  }

  /** Splits bytes already in memory; the views share `bytes`' memory. */
  static fromBytes(bytes: Uint8Array, options: ByteDatasetOptions = {}): ByteDataset {
    const source = options.source ?? "<bytes>";
    const fraction = options.validationFraction ?? DEFAULT_VALIDATION_FRACTION;
    if (!(fraction >= 0 && fraction <= 0.5)) {
      throw new RangeError(`validationFraction must be in [0, 0.5], got ${fraction}`);
    }
    if (bytes.length === 0) throw new Error(`training data ${source} is empty`);
    const validationLength = Math.floor(bytes.length * fraction);
    const split = bytes.length - validationLength;
    return new ByteDataset(bytes.subarray(0, split), bytes.subarray(split), source);
  }
}

/** Where a sampler is in its stream: enough to continue it exactly. */
export interface SamplerPosition {
  seed: number;
  /** How many batches next() has returned. */
  draws: number;
}

export interface Batch {
  /** [B, L] row-major: the bytes the model reads. */
  ids: Int32Array;
  /** [B, L] row-major: the byte after each of ids, the one to predict. */
  targets: Int32Array;
}

const MASK64 = (1n << 64n) - 1n;
const GOLDEN_GAMMA = 0x9e3779b97f4a7c15n;

/**
 * The k-th output (k from 1) of splitmix64 seeded with `seed` (Steele, Lea & Flood, "Fast
 * splittable pseudorandom number generators", 2014). Its state only advances by a constant, so
 * any output can be computed directly: resuming at any draw costs nothing.
 */
function splitmix64(seed: bigint, k: bigint): bigint {
  let z = (seed + k * GOLDEN_GAMMA) & MASK64;
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

function checkPositiveInteger(name: string, value: number): void {
  if (!(Number.isSafeInteger(value) && value >= 1)) throw new RangeError(`${name} must be an integer >= 1, got ${value}`);
}

function checkWindows(what: string, data: Uint8Array, length: number): void {
  if (data.length < length + 1) {
    throw new RangeError(
      `${what} has ${data.length} bytes, fewer than one window of length + 1 = ${length + 1} bytes: ` +
        `use a shorter length or more data`,
    );
  }
}

/**
 * Draws batches of B random windows from `data`, each start uniform over the data.length − L
 * possible starts. The same seed gives the same stream of batches.
 */
export class BatchSampler {
  private readonly data: Uint8Array;
  private readonly batch: number;
  private readonly length: number;
  private readonly seed: number;
  private readonly seed64: bigint;
  private draws = 0;

  constructor(data: Uint8Array, batch: number, length: number, seed: number) {
    checkPositiveInteger("batch", batch);
    checkPositiveInteger("length", length);
    if (!Number.isSafeInteger(seed)) throw new RangeError(`seed must be an integer, got ${seed}`);
    checkWindows("the data to sample", data, length);
    this.data = data;
    this.batch = batch;
    this.length = length;
    this.seed = seed;
    this.seed64 = BigInt.asUintN(64, BigInt(seed));
  }

  /** A sampler that continues the stream of the one whose `position` this was. */
  static resume(data: Uint8Array, batch: number, length: number, position: SamplerPosition): BatchSampler {
    const sampler = new BatchSampler(data, batch, length, position.seed);
    if (!(Number.isSafeInteger(position.draws) && position.draws >= 0)) {
      throw new RangeError(`position.draws must be an integer >= 0, got ${position.draws}`);
    }
    sampler.draws = position.draws;
    return sampler;
  }

  get position(): SamplerPosition {
    return { seed: this.seed, draws: this.draws };
  }

  next(): Batch {
    const { batch: B, length: L, data } = this;
    const starts = BigInt(data.length - L);
    const ids = new Int32Array(B * L);
    const targets = new Int32Array(B * L);
    // The k-th random number of the stream picks the start of window k; the modulo's bias is
    // below starts / 2^64, far under anything a training run could notice.
    const first = BigInt(this.draws) * BigInt(B) + 1n;
    for (let b = 0; b < B; b++) {
      const start = Number(splitmix64(this.seed64, first + BigInt(b)) % starts);
      ids.set(data.subarray(start, start + L), b * L);
      targets.set(data.subarray(start + 1, start + L + 1), b * L);
    }
    this.draws++;
    return { ids, targets };
  }
}

/**
 * The windows an evaluation walks: consecutive from the start of `data`, each starting L bytes
 * after the previous, so every byte after the first is predicted exactly once (a window's last
 * target is the next window's first id). B windows a batch, at most `maxBatches` batches
 * (Infinity: all); the last batch may hold fewer rows, and its arrays are [rows, L].
 */
export function evaluationBatches(
  data: Uint8Array,
  batch: number,
  length: number,
  maxBatches: number,
): Array<Batch & { rows: number }> {
  checkPositiveInteger("batch", batch);
  checkPositiveInteger("length", length);
  if (!(maxBatches === Infinity || (Number.isSafeInteger(maxBatches) && maxBatches >= 1))) {
    throw new RangeError(`maxBatches must be an integer >= 1 or Infinity, got ${maxBatches}`);
  }
  checkWindows("the evaluation data", data, length);
  const windows = Math.min(Math.floor((data.length - 1) / length), maxBatches * batch);
  const batches: Array<Batch & { rows: number }> = [];
  for (let first = 0; first < windows; first += batch) {
    const rows = Math.min(batch, windows - first);
    const ids = new Int32Array(rows * length);
    const targets = new Int32Array(rows * length);
    for (let r = 0; r < rows; r++) {
      const start = (first + r) * length;
      ids.set(data.subarray(start, start + length), r * length);
      targets.set(data.subarray(start + 1, start + length + 1), r * length);
    }
    batches.push({ ids, targets, rows });
  }
  return batches;
}
