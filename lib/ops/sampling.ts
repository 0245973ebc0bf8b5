// Choosing the next token from logits: argmax, and seeded sampling with the usual filters.
import { native } from "../native";
import { Tensor } from "../tensor";
import { ShapeChecker } from "./check";

export interface SamplingOptions {
  /** 0: greedy. Default 1. */
  temperature?: number;
  /** Keep the k most likely tokens; 0: off. */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches p; 1: off. */
  topP?: number;
  /** Drop tokens less likely than minP × the most likely; 0: off. */
  minP?: number;
  /** > 1 discourages tokens in penaltyTokens (HF's rule). Default 1. */
  repetitionPenalty?: number;
  /** Tokens the repetition penalty applies to (each counted once). */
  penaltyTokens?: readonly number[] | Int32Array;
}

function logitsVector(c: ShapeChecker, logits: Tensor | Float32Array): { buffer: ArrayBuffer; vocab: number; temp?: Tensor } {
  if (logits instanceof Float32Array) {
    const t = Tensor.from(logits);
    return { buffer: t.buffer(), vocab: logits.length, temp: t };
  }
  c.tensor("logits", logits);
  if (logits.size === 0) c.fail("logits is empty");
  const vocab = logits.shape[logits.shape.length - 1];
  if (logits.size !== vocab) c.fail(`logits must be one row [vocab] (or [1, vocab]), got [${logits.shape.join(", ")}]`);
  return { buffer: logits.buffer(), vocab };
}

/** Index of the largest logit of each row of logits [..., vocab] (ties: lowest index). */
export function argmax(logits: Tensor): Int32Array {
  const c = new ShapeChecker("argmax");
  c.tensor("logits", logits);
  if (logits.shape.length < 1 || logits.shape[logits.shape.length - 1] === 0) c.fail("logits needs a non-empty last dimension");
  const vocab = logits.shape[logits.shape.length - 1];
  const rows = logits.size / vocab;
  const out = Tensor.zeros([rows], "i32");
  try {
    native().argmax({ logits: logits.buffer(), rows, vocab, out: out.buffer() });
    return (out.data as Int32Array).slice();
  } finally {
    out.dispose();
  }
}

/** A seeded sampler: the same seed and logits give the same tokens. */
export class Sampler {
  #rng: bigint;
  readonly options: Readonly<SamplingOptions>;

  constructor(options: SamplingOptions & { seed?: number | bigint } = {}) {
    const c = new ShapeChecker("Sampler");
    const seed = options.seed ?? Math.floor(Math.random() * 2 ** 53);
    if (typeof seed === "number" && (!Number.isSafeInteger(seed) || seed < 0)) c.fail(`seed must be a non-negative integer, got ${seed}`);
    this.#rng = BigInt.asUintN(64, BigInt(seed));
    const { seed: _seed, ...rest } = options;
    this.options = Object.freeze({ ...rest });
  }

  /** Draws one token from logits [vocab] (not modified). */
  sample(logits: Tensor | Float32Array, override: SamplingOptions = {}): number {
    const c = new ShapeChecker("sample");
    const { buffer, vocab, temp } = logitsVector(c, logits);
    let penalty: Tensor | null = null;
    try {
      const o = this.#resolve(c, override);
      if (o.penaltyTokens.length) penalty = Tensor.from(o.penaltyTokens);
      const result = native().sample({
        logits: buffer,
        vocab,
        temperature: o.temperature,
        topK: o.topK,
        topP: o.topP,
        minP: o.minP,
        repetitionPenalty: o.repetitionPenalty,
        penaltyTokens: penalty ? penalty.buffer() : null,
        penaltyCount: o.penaltyTokens.length,
        rngState: this.#rng,
      });
      this.#rng = result.rngState!;
      return result.token;
    } finally {
      penalty?.dispose();
      temp?.dispose();
    }
  }

  /**
   * What the next sample() would take, for a sampler that runs elsewhere (the GPU's, in a sampling
   * step): the options as sample() checks them, and the uniform draw in [0, 1) it would use. The
   * generator advances as one sample() advances it, so the stream of tokens stays the same.
   */
  nextDraw(override: SamplingOptions = {}): ResolvedSampling & { draw: number } {
    const o = this.#resolve(new ShapeChecker("sample"), override);
    const { draw, rngState } = native().samplingDraw({ rngState: this.#rng });
    this.#rng = rngState;
    return { ...o, draw };
  }

  #resolve(c: ShapeChecker, override: SamplingOptions): ResolvedSampling {
    const o = { ...this.options, ...override };
    const topK = o.topK === undefined ? 0 : o.topK;
    if (!Number.isInteger(topK) || topK < 0) c.fail(`topK must be an integer >= 0, got ${topK}`);
    return {
      temperature: c.finiteNumber("temperature", o.temperature, 1),
      topK,
      topP: c.finiteNumber("topP", o.topP, 1),
      minP: c.finiteNumber("minP", o.minP, 0),
      repetitionPenalty: c.finiteNumber("repetitionPenalty", o.repetitionPenalty, 1),
      penaltyTokens: Int32Array.from(o.penaltyTokens ?? []),
    };
  }
}

/** A sampler's options, checked, with the penalty tokens as an array. */
export interface ResolvedSampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  penaltyTokens: Int32Array;
}

/** One draw with a fresh generator seeded by options.seed. */
export function sample(logits: Tensor | Float32Array, options: SamplingOptions & { seed?: number | bigint } = {}): number {
  return new Sampler(options).sample(logits);
}
