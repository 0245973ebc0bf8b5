// MambaModel: a loaded Mamba-1 or Mamba-2 language model — logits for whole sequences (prefill), the
// recurrent decode step, states, generation, saving.
import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint";
import type { TokenizerSource } from "../io/checkpoint";
import { Tensor } from "../tensor";
import { setThreads } from "../runtime";
import { Sampler } from "../ops/sampling";
import type { ResolvedSampling } from "../ops/sampling";
import type { Tokenizer } from "../tokenizers";
import { ByteTokenizer, loadTokenizerFor, StreamDecoder } from "../tokenizers";
import { StopMatcher } from "../generation/stop";
import { isMatrixWeight, MambaConfig } from "./config";
import { ModelState, sameStateLayout } from "./state";
import * as nativeModel from "./native-model";
import {
  createCudaModel, CudaModel, CudaState, CudaWeightDType, cudaForward, cudaStep, cudaStepSample, cudaUsable, releaseCudaModel,
} from "./cuda-model";

/** Where a model runs: the CPU, or an NVIDIA GPU ("cuda" is device 0, "cuda:1" device 1). */
export type Device = "cpu" | "cuda" | `cuda:${number}`;

export interface LoadModelOptions {
  /**
   * Convert the matrices at load: "f32", "bf16" or "q8_0" (default: keep the stored dtype). On CUDA
   * the matrices are f32 or bf16: the default keeps f32 matrices f32 and stores any other as bf16.
   */
  dtype?: "f32" | "bf16" | "q8_0";
  /** Threads for the kernels (a process-wide setting). */
  threads?: number;
  /** "cpu" (default), or "cuda" / "cuda:N" with an addon built by `npm run build:cuda`. */
  device?: Device;
}

/** The CUDA device index of a Device string, or null for "cpu"; throws for anything else. */
function parseDevice(what: string, device: Device | undefined): number | null {
  if (device === undefined || device === "cpu") return null;
  if (device === "cuda") return 0;
  const m = typeof device === "string" ? /^cuda:(\d+)$/.exec(device) : null;
  if (!m) throw new Error(`${what}: device must be "cpu", "cuda" or "cuda:N", got ${JSON.stringify(device)}`);
  return Number(m[1]);
}

/** The dtype asked for the matrices on CUDA (undefined: choose from the weights); throws for one CUDA has not. */
function cudaDTypeOption(what: string, dtype: string | undefined): CudaWeightDType | undefined {
  if (dtype === undefined || dtype === "f32" || dtype === "bf16") return dtype;
  throw new Error(`${what}: dtype "${dtype}" runs on the CPU only; on device "cuda" the matrices are "f32" or "bf16"`);
}

/** The dtype of the matrices on CUDA: the one asked for, else f32 when every matrix is f32, else bf16. */
function cudaWeightDType(asked: CudaWeightDType | undefined, weights: ReadonlyMap<string, Tensor>): CudaWeightDType {
  if (asked) return asked;
  for (const [name, t] of weights) if (isMatrixWeight(name) && t.dtype !== "f32") return "bf16";
  return "f32";
}

export interface GenerateOptions {
  /** Tokens to generate at most. Default 128. */
  maxTokens?: number;
  /** 0 is greedy. Default 0.8. */
  temperature?: number;
  /** Default 40 (0: off). */
  topK?: number;
  /** Default 0.95 (1: off). */
  topP?: number;
  /** Default 0 (off). */
  minP?: number;
  /** Default 1 (off); applies to the prompt's and the generated tokens. */
  repetitionPenalty?: number;
  /** Seed of the sampler: the same seed, prompt and options give the same text. */
  seed?: number;
  /** Strings that end generation (not included in the text). */
  stop?: string | readonly string[];
  /** Ends generation early (finishReason "abort"). */
  signal?: AbortSignal;
  /** Keep going past the end-of-text token. Default false. */
  ignoreEos?: boolean;
}

export interface GenerationChunk {
  /** Text that became complete with this token (may be empty: part of a UTF-8 character, or held for a stop string). */
  text: string;
  /** The token generated, or null for the text released when generation ends. */
  token: number | null;
}

export type FinishReason = "length" | "stop" | "eos" | "abort";

export interface GenerationStats {
  promptTokens: number;
  generatedTokens: number;
  prefillMs: number;
  decodeMs: number;
  prefillTokensPerSecond: number;
  decodeTokensPerSecond: number;
  finishReason: FinishReason;
}

export interface Completion {
  text: string;
  tokens: number[];
  stats: GenerationStats;
}

type Prompt = string | readonly number[] | Int32Array;
type TokenBatch = readonly (readonly number[] | Int32Array)[];

const now = () => performance.now();

export class MambaModel {
  readonly config: Readonly<MambaConfig>;
  /** Where the model was loaded from, and in which format. */
  readonly source: string;
  readonly format: string;
  #weights: Map<string, Tensor>;
  /** Where the model runs. */
  readonly device: "cpu" | "cuda";
  #handle: nativeModel.NativeModel | null;
  #cuda: CudaModel | null;
  #tokenizer: Tokenizer | null;
  #tokenizerSource: TokenizerSource | undefined;
  #queue: Promise<unknown> = Promise.resolve();

  /** @internal */
  constructor(args: {
    config: MambaConfig;
    weights: Map<string, Tensor>;
    source: string;
    format: string;
    tokenizer: Tokenizer | null;
    tokenizerSource?: TokenizerSource;
    cuda?: { device: number; weightDType: CudaWeightDType };
  }) {
    this.config = Object.freeze({ ...args.config });
    this.#weights = args.weights;
    this.source = args.source;
    this.format = args.format;
    this.#tokenizer = args.tokenizer;
    this.#tokenizerSource = args.tokenizerSource;
    if (args.cuda) {
      this.device = "cuda";
      this.#handle = null;
      this.#cuda = createCudaModel(args.config, args.weights, args.cuda);
    } else {
      this.device = "cpu";
      this.#cuda = null;
      this.#handle = nativeModel.createNativeModel(args.config, args.weights);
    }
  }

  /**
   * A model from weights in memory, under the canonical names of lib/models/config.ts (see
   * initWeights for fresh ones). The model takes ownership of the tensors: dispose() frees them.
   */
  static fromWeights(
    config: MambaConfig,
    weights: Map<string, Tensor>,
    options: { tokenizer?: Tokenizer | null; source?: string; device?: Device; dtype?: CudaWeightDType } = {},
  ): MambaModel {
    const tokenizer = options.tokenizer !== undefined ? options.tokenizer : config.vocabSize === 256 ? new ByteTokenizer() : null;
    const index = parseDevice("fromWeights", options.device);
    const cuda = index === null ? undefined : { device: index, weightDType: cudaWeightDType(cudaDTypeOption("fromWeights", options.dtype), weights) };
    return new MambaModel({ config, weights, source: options.source ?? "(in memory)", format: "memory", tokenizer, cuda });
  }

  /** The model's tokenizer; byte-level models without one get the 256-byte tokenizer. */
  get tokenizer(): Tokenizer {
    if (!this.#tokenizer) {
      throw new Error(
        `${this.source}: the model has no tokenizer (no tokenizer.json beside it, no tokenizer in the GGUF, ` +
          `vocabulary ${this.config.vocabSize} is not byte-level); pass token ids instead of text`,
      );
    }
    return this.#tokenizer;
  }

  get hasTokenizer(): boolean {
    return this.#tokenizer !== null;
  }

  /** The weights under their canonical names (see lib/models/config.ts). */
  get weights(): ReadonlyMap<string, Tensor> {
    return this.#live().weights;
  }

  /** Number of parameters (a tied head counted once). */
  get parameterCount(): number {
    let n = 0;
    for (const t of this.#weights.values()) n += t.size;
    return n;
  }

  /** Bytes the weights take in memory. */
  get weightBytes(): number {
    let n = 0;
    for (const t of this.#weights.values()) n += t.byteLength;
    return n;
  }

  /** Bytes the weights take on the GPU (0 for a model on the CPU). */
  get deviceWeightBytes(): number {
    return this.#cuda ? this.#cuda.weightBytes : 0;
  }

  #live(): { handle: nativeModel.NativeModel | null; cuda: CudaModel | null; weights: Map<string, Tensor> } {
    if (!this.#handle && !this.#cuda) throw new Error(`${this.source}: the model has been disposed`);
    return { handle: this.#handle, cuda: this.#cuda, weights: this.#weights };
  }

  /** Runs native calls one at a time (they share the model's scratch buffers). */
  #serial<T>(work: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(work, work);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  #checkIds(what: string, ids: ArrayLike<number>): Int32Array {
    const out = new Int32Array(ids.length);
    for (let i = 0; i < ids.length; i++) {
      const v = ids[i];
      if (!Number.isInteger(v) || v < 0 || v >= this.config.vocabSize) {
        throw new Error(`${what}: token id ${v} at position ${i} is outside [0, ${this.config.vocabSize})`);
      }
      out[i] = v;
    }
    return out;
  }

  #batch(what: string, ids: TokenBatch | readonly number[] | Int32Array): { flat: Int32Array; lengths: number[] } {
    const rows: readonly ArrayLike<number>[] =
      ids instanceof Int32Array || (Array.isArray(ids) && (ids.length === 0 || typeof ids[0] === "number"))
        ? [ids as ArrayLike<number>]
        : (ids as TokenBatch);
    if (rows.length === 0) throw new Error(`${what}: no sequences given`);
    const lengths = rows.map((r, i) => {
      if (!r || typeof r.length !== "number") throw new Error(`${what}: sequence ${i} is not an array of token ids`);
      if (r.length === 0) throw new Error(`${what}: sequence ${i} is empty`);
      return r.length;
    });
    const flat = new Int32Array(lengths.reduce((a, b) => a + b, 0));
    let o = 0;
    rows.forEach((r, i) => {
      flat.set(this.#checkIds(`${what}: sequence ${i}`, r), o);
      o += r.length;
    });
    return { flat, lengths };
  }

  /**
   * Logits for every position of each sequence: [batch, longest length, vocab] (positions past a
   * sequence's end are zero). ids: one sequence (number[] / Int32Array) or a batch of them.
   */
  forward(ids: TokenBatch | readonly number[] | Int32Array): Promise<Tensor> {
    const { handle, cuda } = this.#live();
    const { flat, lengths } = this.#batch("forward", ids);
    const longest = Math.max(...lengths);
    const logits = Tensor.zeros([lengths.length, longest, this.config.vocabSize]);
    return this.#serial(async () => {
      if (cuda) await cudaForward(cuda, { ids: flat, lengths, lastOnly: false, logits, paddedLength: longest });
      else await nativeModel.forward(handle!, { ids: flat, lengths, lastOnly: false, logits });
      return logits;
    });
  }

  /** A zero state for `batch` sequences (the state before any token). */
  createState(batch = 1): ModelState {
    const { cuda } = this.#live();
    if (!cuda) return ModelState.zeros(this.config, batch);
    return new ModelState(this.config, batch, null, null, undefined, CudaState.create(cuda, batch));
  }

  #checkState(what: string, state: ModelState, batch: number) {
    if (!(state instanceof ModelState)) throw new Error(`${what}: state must come from createState() or loadState()`);
    if (state.disposed) throw new Error(`${what}: the state has been disposed`);
    if (!sameStateLayout(state.config, this.config)) throw new Error(`${what}: the state belongs to a model of another shape`);
    if (state.batch !== batch) throw new Error(`${what}: the state holds ${state.batch} sequences, ${batch} given`);
    if (state.device !== this.device) {
      throw new Error(
        `${what}: the state lives on device "${state.device}", the model on "${this.device}"; ` +
          `model.loadState(state.save()) moves a state to the model's device`,
      );
    }
  }

  /**
   * Feeds whole sequences into a state (continuing from it) and returns the logits of each sequence's
   * last token, [batch, vocab]. The chunked / sequence kernels do the work in one native call.
   */
  prefill(state: ModelState, ids: TokenBatch | readonly number[] | Int32Array): Promise<Tensor> {
    const { handle, cuda } = this.#live();
    const { flat, lengths } = this.#batch("prefill", ids);
    this.#checkState("prefill", state, lengths.length);
    const logits = Tensor.zeros([lengths.length, this.config.vocabSize]);
    return this.#serial(async () => {
      if (cuda) {
        await cudaForward(cuda, { ids: flat, lengths, lastOnly: true, logits, state: state.deviceState as CudaState, useInitialState: true });
      } else {
        await nativeModel.forward(handle!, {
          ids: flat, lengths, lastOnly: true, logits, convState: state.conv, ssmState: state.ssm, useInitialState: true,
        });
      }
      lengths.forEach((n, i) => (state.positions[i] += n));
      return logits;
    });
  }

  /** One token per sequence through the recurrent form; updates the state; logits [batch, vocab]. */
  step(state: ModelState, ids: readonly number[] | Int32Array): Promise<Tensor> {
    const { handle, cuda } = this.#live();
    const tokens = this.#checkIds("step", ids);
    this.#checkState("step", state, tokens.length);
    const logits = Tensor.zeros([tokens.length, this.config.vocabSize]);
    return this.#serial(async () => {
      if (cuda) await cudaStep(cuda, { ids: tokens, state: state.deviceState as CudaState, logits });
      else await nativeModel.step(handle!, { ids: tokens, convState: state.conv, ssmState: state.ssm, logits });
      for (let i = 0; i < tokens.length; i++) state.positions[i] += 1;
      return logits;
    });
  }

  /** A decode step of one sequence on the GPU that draws its next token there. */
  #stepSample(state: ModelState, token: number, draw: ResolvedSampling & { draw: number }): Promise<number> {
    const { cuda } = this.#live();
    const tokens = this.#checkIds("step", [token]);
    this.#checkState("step", state, 1);
    return this.#serial(async () => {
      const out = await cudaStepSample(cuda!, {
        ids: tokens,
        state: state.deviceState as CudaState,
        sampling: {
          ...draw,
          penaltyTokens: draw.penaltyTokens.length ? draw.penaltyTokens : null,
          penaltyCount: draw.penaltyTokens.length,
          draws: Float32Array.of(draw.draw),
        },
      });
      state.positions[0] += 1;
      return out[0];
    });
  }

  /** A state saved with state.save(), on the model's device. */
  loadState(data: Uint8Array): ModelState {
    const { cuda } = this.#live();
    const host = ModelState.load(this.config, data);
    if (!cuda) return host;
    try {
      const device = CudaState.create(cuda, host.batch);
      try {
        device.write(host.conv, host.ssm);
      } catch (e) {
        device.dispose();
        throw e;
      }
      return new ModelState(this.config, host.batch, null, null, [...host.positions], device);
    } finally {
      host.dispose();
    }
  }

  #encode(what: string, prompt: Prompt): number[] {
    if (typeof prompt === "string") {
      const ids = this.tokenizer.encode(prompt);
      if (ids.length === 0 && this.config.bosTokenId !== undefined) return [this.config.bosTokenId];
      if (ids.length === 0) throw new Error(`${what}: the prompt is empty`);
      return ids;
    }
    if (prompt.length === 0) throw new Error(`${what}: the prompt is empty`);
    return Array.from(this.#checkIds(what, prompt));
  }

  /**
   * Streams generated text: `for await (const {text} of model.generate("Once upon", {maxTokens: 50}))`.
   * The iterator's return value carries the statistics.
   */
  async *generate(prompt: Prompt, options: GenerateOptions = {}): AsyncGenerator<GenerationChunk, GenerationStats, undefined> {
    const o = checkGenerateOptions(options);
    const ids = this.#encode("generate", prompt);
    const decoder = this.#tokenizer ? new StreamDecoder(this.#tokenizer) : null;
    const stop = new StopMatcher(o.stop);
    const sampler = new Sampler({ seed: o.seed, temperature: o.temperature, topK: o.topK, topP: o.topP, minP: o.minP, repetitionPenalty: o.repetitionPenalty });
    const history = [...ids];
    const stats: GenerationStats = {
      promptTokens: ids.length, generatedTokens: 0, prefillMs: 0, decodeMs: 0,
      prefillTokensPerSecond: 0, decodeTokensPerSecond: 0, finishReason: "length",
    };
    const state = this.createState(1);
    const penalty = () => (o.repetitionPenalty !== 1 ? { penaltyTokens: history } : {});
    let logits: Tensor | null = null;
    // On a GPU, each step draws its token there (cudaStepSample) with the draws of the same sampler,
    // so only the token comes back; the first token is drawn here from the prefill's logits.
    let drawn: number | null = null;
    try {
      let t0 = now();
      logits = await this.prefill(state, [ids]);
      stats.prefillMs = now() - t0;
      t0 = now();
      for (let i = 0; i < o.maxTokens; i++) {
        if (o.signal?.aborted) {
          stats.finishReason = "abort";
          break;
        }
        let token: number;
        if (drawn !== null) {
          token = drawn;
          drawn = null;
        } else {
          const current: Tensor = logits!;
          token = sampler.sample(current, penalty());
          current.dispose();
          logits = null;
        }
        history.push(token);
        stats.generatedTokens++;
        if (!o.ignoreEos && this.config.eosTokenId !== undefined && token === this.config.eosTokenId) {
          stats.finishReason = "eos";
          break;
        }
        const piece = decoder ? decoder.push(token) : "";
        const { emit, stopped } = stop.push(piece);
        yield { text: emit, token };
        if (stopped) {
          stats.finishReason = "stop";
          break;
        }
        if (i + 1 < o.maxTokens) {
          if (this.#cuda) drawn = await this.#stepSample(state, token, sampler.nextDraw(penalty()));
          else logits = await this.step(state, [token]);
        }
      }
      stats.decodeMs = now() - t0;
      if (stats.finishReason !== "stop") {
        const rest = stop.push(decoder ? decoder.flush() : "");
        const tail = rest.stopped ? rest.emit : rest.emit + stop.flush();
        if (rest.stopped) stats.finishReason = "stop";
        if (tail) yield { text: tail, token: null };
      }
    } finally {
      logits?.dispose();
      state.dispose();
    }
    stats.prefillTokensPerSecond = stats.prefillMs > 0 ? (1000 * stats.promptTokens) / stats.prefillMs : 0;
    stats.decodeTokensPerSecond = stats.decodeMs > 0 ? (1000 * stats.generatedTokens) / stats.decodeMs : 0;
    return stats;
  }

  /** Generates to the end and returns the text, the tokens and the statistics. */
  async complete(prompt: Prompt, options: GenerateOptions = {}): Promise<Completion> {
    const it = this.generate(prompt, options);
    let text = "";
    const tokens: number[] = [];
    for (;;) {
      const r = await it.next();
      if (r.done) return { text, tokens, stats: r.value };
      text += r.value.text;
      if (r.value.token !== null) tokens.push(r.value.token);
    }
  }

  /** Writes the model as a Hugging Face folder ("safetensors") or one GGUF file, optionally converting the matrices. */
  async save(path: string, options: { format: "safetensors" | "gguf"; dtype?: "f32" | "f16" | "bf16" | "q8_0" }): Promise<void> {
    const { weights } = this.#live();
    await saveCheckpoint(path, { config: this.config, weights, tokenizer: this.#tokenizerSource }, options);
  }

  /** Frees the weights and the native model now. */
  dispose(): void {
    if (!this.#handle && !this.#cuda) return;
    if (this.#handle) nativeModel.release(this.#handle);
    if (this.#cuda) releaseCudaModel(this.#cuda);
    this.#handle = null;
    this.#cuda = null;
    // A weight still pinned by a call in flight is freed once the queued calls have settled.
    const busy = [...this.#weights.values()].filter((t) => {
      try {
        if (!t.disposed) t.dispose();
        return false;
      } catch {
        return true;
      }
    });
    if (busy.length) {
      const free = () => busy.forEach((t) => t.disposed || t.dispose());
      void this.#queue.then(free, free);
    }
  }
}

function checkGenerateOptions(options: GenerateOptions) {
  const fail = (msg: string): never => {
    throw new Error(`generate: ${msg}`);
  };
  const num = (name: keyof GenerateOptions, fallback: number, ok: (v: number) => boolean, expect: string): number => {
    const v = options[name];
    if (v === undefined) return fallback;
    if (typeof v !== "number" || !ok(v)) fail(`${name} must be ${expect}, got ${JSON.stringify(v)}`);
    return v as number;
  };
  const stopOption = options.stop === undefined ? [] : typeof options.stop === "string" ? [options.stop] : [...options.stop];
  return {
    maxTokens: num("maxTokens", 128, (v) => Number.isInteger(v) && v >= 0, "an integer >= 0"),
    temperature: num("temperature", 0.8, (v) => v >= 0 && Number.isFinite(v), "a number >= 0"),
    topK: num("topK", 40, (v) => Number.isInteger(v) && v >= 0, "an integer >= 0"),
    topP: num("topP", 0.95, (v) => v > 0 && v <= 1, "in (0, 1]"),
    minP: num("minP", 0, (v) => v >= 0 && v <= 1, "in [0, 1]"),
    repetitionPenalty: num("repetitionPenalty", 1, (v) => v > 0 && Number.isFinite(v), "a number > 0"),
    seed: num("seed", Math.floor(Math.random() * 2 ** 32), (v) => Number.isSafeInteger(v) && v >= 0, "a non-negative integer"),
    stop: stopOption,
    signal: options.signal,
    ignoreEos: options.ignoreEos ?? false,
  };
}

/**
 * Loads a Mamba language model: a Hugging Face folder (config.json + model.safetensors or shards), a
 * mamba_ssm folder, or a GGUF file of llama.cpp's mamba / mamba2 architectures.
 */
export async function loadModel(path: string, options: LoadModelOptions = {}): Promise<MambaModel> {
  const index = parseDevice("loadModel", options.device);
  // Before the checkpoint is read: a dtype CUDA cannot run, or no usable device, is refused at once.
  const asked = index === null ? undefined : cudaDTypeOption("loadModel", options.dtype);
  if (index !== null) cudaUsable("loadModel", index);
  if (options.threads !== undefined) setThreads(options.threads);
  const ckpt = await loadCheckpoint(path, { dtype: options.dtype });
  let tokenizer: Tokenizer | null = null;
  if (ckpt.tokenizer) {
    // The model's vocabulary may be padded past the tokenizer's (e.g. 50280 rows for 50277 tokens).
    const source = ckpt.tokenizer.kind === "tokenizer.json" ? { ...ckpt.tokenizer, vocabSize: ckpt.config.vocabSize } : ckpt.tokenizer;
    tokenizer = await loadTokenizerFor(source);
  }
  else if (ckpt.config.vocabSize === 256) tokenizer = new ByteTokenizer();
  try {
    return new MambaModel({
      config: ckpt.config,
      weights: ckpt.weights,
      source: path,
      format: ckpt.format,
      tokenizer,
      tokenizerSource: ckpt.tokenizer,
      cuda: index === null ? undefined : { device: index, weightDType: cudaWeightDType(asked, ckpt.weights) },
    });
  } catch (e) {
    // The model was not made (a weight refused, the device out of memory): its weights are freed now.
    for (const t of ckpt.weights.values()) if (!t.disposed) t.dispose();
    throw e;
  }
}
