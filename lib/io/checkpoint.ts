// Loading and saving whole Mamba checkpoints, whatever the format, as the normalised MambaConfig and
// the canonical weight names of lib/models/config.ts:
//   - Hugging Face folders (config.json of MambaForCausalLM / Mamba2ForCausalLM + model.safetensors or
//     a sharded index), and the same folders of models with mixture-of-experts blocks that this
//     library writes (model_type "mamba_moe" / "mamba2_moe", see hfConfigJson),
//   - mamba_ssm folders (state-spaces/mamba-*: d_model, n_layer, ssm_cfg …, weights in safetensors),
//   - GGUF files of llama.cpp's "mamba" and "mamba2" architectures.
// Format facts: /work/shared/FORMATS.md. Weights are mapped from the files; only what needs converting
// (A from A_log, 1-D tensors stored in f16/bf16, matrices when options.dtype asks) is copied.
import * as fs from "fs";
import * as path from "path";
import { DType } from "../dtype";
import { expectedShapes, isMatrixWeight, MambaConfig, MoeConfig } from "../models/config";
import { formatShape, Tensor } from "../tensor";
import { ggufVocabToTokenizerJson, tokenizerJsonToGgufVocab } from "../tokenizers/gguf";
import type { TokenizerJson } from "../tokenizers/huggingface";
import { writeBytesAtomic } from "./atomic";
import { gguf, GgufArray, GgufEntry, ggufNumber, ggufString, readGguf, writeGguf } from "./gguf";
import { parsePythonJson, stringifyPythonJson } from "./json";
import { readSafetensors, readShardedSafetensors, writeSafetensors } from "./safetensors";

export type CheckpointFormat = "hf" | "mamba_ssm" | "gguf";
export type WeightDType = "f32" | "f16" | "bf16" | "q8_0";

/** Where the tokenizer comes from: a tokenizer.json beside the config, or the tables inside a GGUF. */
export type TokenizerSource =
  | { kind: "tokenizer.json"; path: string }
  | {
      kind: "gguf";
      tokens: string[];
      merges: string[];
      tokenTypes?: number[];
      bos?: number;
      eos?: number;
      /** tokenizer.ggml.model ("gpt2" for byte-level BPE). */
      model?: string;
    };

export interface Checkpoint {
  config: MambaConfig;
  /** Canonical names (lib/models/config.ts) → tensors. */
  weights: Map<string, Tensor>;
  format: CheckpointFormat;
  tokenizer?: TokenizerSource;
  /** The file or folder it was loaded from. */
  source: string;
}

export interface LoadCheckpointOptions {
  /** Convert the matrix weights at load (default: keep the stored dtype). */
  dtype?: WeightDType;
}

export interface SaveCheckpointOptions {
  /** "safetensors": a Hugging Face folder; "gguf": one llama.cpp GGUF file. */
  format: "safetensors" | "gguf";
  /** Store the matrix weights in this dtype (default: as they are; q8_0 only in GGUF). */
  dtype?: WeightDType;
}

const WEIGHT_DTYPES: readonly WeightDType[] = ["f32", "f16", "bf16", "q8_0"];

// ---------------------------------------------------------------------------------------------------
// Config fields

/** Reads typed fields of a JSON config, with an Error naming the file and the field. */
class ConfigFields {
  constructor(
    private readonly json: Record<string, unknown>,
    private readonly file: string,
  ) {}

  has(key: string): boolean {
    const v = this.json[key];
    return v !== undefined && v !== null;
  }

  private missing(key: string, expected: string): never {
    throw new Error(`${this.file}: config field "${key}" is missing (expected ${expected})`);
  }

  private wrong(key: string, expected: string): never {
    throw new Error(`${this.file}: config field "${key}" must be ${expected}, found ${JSON.stringify(this.json[key])}`);
  }

  integer(key: string, fallback?: number, min = 1): number {
    if (!this.has(key)) return fallback ?? this.missing(key, `an integer >= ${min}`);
    const v = this.json[key];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) this.wrong(key, `an integer >= ${min}`);
    return v as number;
  }

  number(key: string, fallback?: number): number {
    if (!this.has(key)) return fallback ?? this.missing(key, "a number");
    const v = this.json[key];
    if (typeof v !== "number" || Number.isNaN(v)) this.wrong(key, "a number");
    return v as number;
  }

  boolean(key: string, fallback: boolean): boolean {
    if (!this.has(key)) return fallback;
    const v = this.json[key];
    if (typeof v !== "boolean") this.wrong(key, "true or false");
    return v as boolean;
  }

  optionalId(key: string): number | undefined {
    if (!this.has(key)) return undefined;
    return this.integer(key, undefined, 0);
  }

  /** An integer, or "auto" meaning `auto`. */
  integerOrAuto(key: string, auto: number): number {
    if (!this.has(key) || this.json[key] === "auto") return auto;
    return this.integer(key);
  }

  string<T extends string>(key: string, choices: readonly T[], fallback: T): T {
    if (!this.has(key)) return fallback;
    const v = this.json[key];
    if (typeof v !== "string" || !(choices as readonly string[]).includes(v)) this.wrong(key, `one of ${choices.map((c) => JSON.stringify(c)).join(", ")}`);
    return v as T;
  }

  integers(key: string): number[] {
    const v = this.json[key];
    if (!Array.isArray(v) || !v.every((x) => typeof x === "number" && Number.isSafeInteger(x) && x >= 0)) {
      this.wrong(key, "an array of integers >= 0");
    }
    return v as number[];
  }

  pair(key: string, fallback: [number, number]): [number, number] {
    if (!this.has(key)) return fallback;
    const v = this.json[key];
    if (!Array.isArray(v) || v.length !== 2 || !v.every((x) => typeof x === "number")) this.wrong(key, "[min, max]");
    return [v[0] as number, v[1] as number];
  }

  object(key: string): ConfigFields {
    const v = this.has(key) ? this.json[key] : {};
    if (typeof v !== "object" || v === null || Array.isArray(v)) this.wrong(key, "an object");
    return new ConfigFields(v as Record<string, unknown>, `${this.file} (${key})`);
  }

  value(key: string): unknown {
    return this.json[key];
  }
}

function checkHeads(file: string, c: MambaConfig, headsField: string, headDimField: string): void {
  if (c.numHeads * c.headDim !== c.intermediateSize) {
    throw new Error(
      `${file}: ${headsField} (${c.numHeads}) × ${headDimField} (${c.headDim}) must equal the inner size ${c.intermediateSize}`,
    );
  }
  if (c.numHeads % c.numGroups !== 0 || c.intermediateSize % c.numGroups !== 0) {
    throw new Error(`${file}: the ${c.numHeads} heads cannot be split into ${c.numGroups} groups`);
  }
}

/**
 * The MoE blocks of a config.json written by hfConfigJson (model_type "mamba_moe" / "mamba2_moe": a
 * Hugging Face Mamba config plus these fields), or undefined when it has none.
 */
function moeFromHf(f: ConfigFields, numLayers: number, file: string): MoeConfig | undefined {
  if (!f.has("moe_layers")) return undefined;
  const layers = f.integers("moe_layers");
  for (let i = 0; i < layers.length; i++) {
    if (layers[i] >= numLayers || (i > 0 && layers[i] <= layers[i - 1])) {
      throw new Error(`${file}: config field "moe_layers" must list layer indices below ${numLayers} in increasing order, found ${JSON.stringify(layers)}`);
    }
  }
  return {
    layers,
    numExperts: f.integer("num_experts"),
    topK: f.integer("num_experts_per_tok", 1),
    hiddenSize: f.integer("moe_intermediate_size"),
    scoring: f.string("moe_scoring", ["softmax", "sigmoid"] as const, "softmax"),
    renormalize: f.boolean("moe_renormalize", true),
    activation: f.string("moe_hidden_act", ["silu", "gelu", "gelu_tanh"] as const, "silu"),
    bias: f.boolean("moe_bias", false),
  };
}

/** MambaConfig from a Hugging Face config.json (model_type "mamba" or "mamba2"), with the library's defaults. */
export function configFromHf(json: Record<string, unknown>, file: string): MambaConfig {
  const f = new ConfigFields(json, file);
  const architectures = Array.isArray(json.architectures) ? (json.architectures as unknown[]) : [];
  const mamba2 =
    json.model_type === "mamba2" ||
    json.model_type === "mamba2_moe" ||
    architectures.includes("Mamba2ForCausalLM") ||
    architectures.includes("Mamba2MoeForCausalLM");
  const hiddenSize = f.integer("hidden_size");
  const numLayers = f.integer("num_hidden_layers");
  const common = {
    hiddenSize,
    numLayers,
    moe: moeFromHf(f, numLayers, file),
    vocabSize: f.integer("vocab_size"),
    convKernel: f.integer("conv_kernel", 4),
    normEps: f.number("layer_norm_epsilon", 1e-5),
    useBias: f.boolean("use_bias", false),
    useConvBias: f.boolean("use_conv_bias", true),
    bosTokenId: f.optionalId("bos_token_id"),
    eosTokenId: f.optionalId("eos_token_id"),
    padTokenId: f.optionalId("pad_token_id"),
  };
  const expand = f.number("expand", 2);
  if (!mamba2) {
    return withoutUndefined({
      architecture: "mamba1",
      ...common,
      intermediateSize: f.integer("intermediate_size", Math.floor(expand * hiddenSize)),
      stateSize: f.integer("state_size", 16),
      timeStepRank: f.integerOrAuto("time_step_rank", Math.ceil(hiddenSize / 16)),
      numHeads: 0,
      headDim: 0,
      numGroups: 0,
      chunkSize: 0,
      timeStepLimit: [0, Infinity],
      normBeforeGate: false,
      tieEmbeddings: f.boolean("tie_word_embeddings", true),
    });
  }
  if (!f.boolean("rms_norm", true)) {
    throw new Error(`${file}: config field "rms_norm" is false; Mamba-2 without the gated RMSNorm is not supported`);
  }
  const headDim = f.integer("head_dim", 64);
  const intermediateSize = f.integer("intermediate_size", Math.floor(expand * hiddenSize));
  const config: MambaConfig = withoutUndefined({
    architecture: "mamba2",
    ...common,
    intermediateSize,
    stateSize: f.integer("state_size", 128),
    timeStepRank: 0,
    numHeads: f.integer("num_heads", Math.floor(intermediateSize / headDim)),
    headDim,
    numGroups: f.integer("n_groups", 8),
    chunkSize: f.integer("chunk_size", 256),
    timeStepLimit: f.pair("time_step_limit", [0, Infinity]),
    normBeforeGate: f.boolean("norm_before_gate", false),
    tieEmbeddings: f.boolean("tie_word_embeddings", false),
  });
  checkHeads(file, config, "num_heads", "head_dim");
  return config;
}

/** MambaConfig from a mamba_ssm config.json (d_model, n_layer, ssm_cfg …), vocabulary padded as mamba_ssm pads it. */
export function configFromMambaSsm(json: Record<string, unknown>, file: string): MambaConfig {
  const f = new ConfigFields(json, file);
  const ssm = f.object("ssm_cfg");
  const layer = ssm.value("layer") ?? "Mamba1";
  if (layer !== "Mamba1" && layer !== "Mamba2") {
    throw new Error(`${file}: ssm_cfg.layer must be "Mamba1" or "Mamba2", found ${JSON.stringify(layer)}`);
  }
  if (f.has("d_intermediate") && f.integer("d_intermediate", 0, 0) !== 0) {
    throw new Error(`${file}: config field "d_intermediate" is ${String(f.value("d_intermediate"))}; models with MLP blocks are not supported (expected 0)`);
  }
  const attention = f.value("attn_layer_idx");
  if (Array.isArray(attention) && attention.length > 0) {
    throw new Error(`${file}: config field "attn_layer_idx" lists attention layers; hybrid attention models are not supported`);
  }
  if (!f.boolean("rms_norm", true)) {
    throw new Error(`${file}: config field "rms_norm" is false; LayerNorm models are not supported`);
  }
  const hiddenSize = f.integer("d_model");
  const mamba2 = layer === "Mamba2";
  const multiple = f.integer("pad_vocab_size_multiple", 8);
  const vocab = f.integer("vocab_size");
  const expand = ssm.number("expand", 2);
  const intermediateSize = Math.floor(expand * hiddenSize);
  const common = {
    hiddenSize,
    numLayers: f.integer("n_layer"),
    vocabSize: Math.ceil(vocab / multiple) * multiple,
    intermediateSize,
    convKernel: ssm.integer("d_conv", 4),
    normEps: f.number("norm_epsilon", 1e-5),
    useBias: ssm.boolean("bias", false),
    useConvBias: ssm.boolean("conv_bias", true),
    tieEmbeddings: f.boolean("tie_embeddings", true),
  };
  if (!mamba2) {
    return {
      architecture: "mamba1",
      ...common,
      stateSize: ssm.integer("d_state", 16),
      timeStepRank: ssm.integerOrAuto("dt_rank", Math.ceil(hiddenSize / 16)),
      numHeads: 0,
      headDim: 0,
      numGroups: 0,
      chunkSize: 0,
      timeStepLimit: [0, Infinity],
      normBeforeGate: false,
    };
  }
  if (ssm.has("d_ssm") && ssm.integer("d_ssm") !== intermediateSize) {
    throw new Error(`${file}: ssm_cfg.d_ssm (${String(ssm.value("d_ssm"))}) differs from expand × d_model (${intermediateSize}); a partial SSM is not supported`);
  }
  if (ssm.boolean("D_has_hdim", false)) throw new Error(`${file}: ssm_cfg.D_has_hdim is true; only one D per head is supported`);
  if (!ssm.boolean("rmsnorm", true)) throw new Error(`${file}: ssm_cfg.rmsnorm is false; Mamba-2 without the gated RMSNorm is not supported`);
  const headDim = ssm.integer("headdim", 64);
  const config: MambaConfig = {
    architecture: "mamba2",
    ...common,
    stateSize: ssm.integer("d_state", 128),
    timeStepRank: 0,
    numHeads: Math.floor(intermediateSize / headDim),
    headDim,
    numGroups: ssm.integer("ngroups", 1),
    chunkSize: ssm.integer("chunk_size", 256),
    timeStepLimit: ssm.pair("dt_limit", [0, Infinity]),
    normBeforeGate: ssm.boolean("norm_before_gate", false),
  };
  checkHeads(file, config, "d_inner / headdim", "ssm_cfg.headdim");
  return config;
}

function withoutUndefined<T extends object>(o: T): T {
  for (const k of Object.keys(o) as (keyof T)[]) if (o[k] === undefined) delete o[k];
  return o;
}

/**
 * The Hugging Face config.json of a model (MambaForCausalLM or Mamba2ForCausalLM). A model with MoE
 * blocks gets model_type "mamba_moe" / "mamba2_moe" (this library's; Hugging Face has no such class)
 * and the fields moe_layers, num_experts, num_experts_per_tok, moe_intermediate_size, moe_scoring,
 * moe_renormalize, moe_hidden_act and moe_bias.
 */
export function hfConfigJson(config: MambaConfig): Record<string, unknown> {
  const plain = hfConfigJsonOf(config);
  const m = config.moe;
  if (!m) return plain;
  const mamba1 = config.architecture === "mamba1";
  return {
    ...plain,
    architectures: [mamba1 ? "MambaMoeForCausalLM" : "Mamba2MoeForCausalLM"],
    model_type: mamba1 ? "mamba_moe" : "mamba2_moe",
    moe_layers: [...m.layers],
    num_experts: m.numExperts,
    num_experts_per_tok: m.topK,
    moe_intermediate_size: m.hiddenSize,
    moe_scoring: m.scoring,
    moe_renormalize: m.renormalize,
    moe_hidden_act: m.activation,
    moe_bias: m.bias,
  };
}

function hfConfigJsonOf(config: MambaConfig): Record<string, unknown> {
  const c = config;
  const ids: Record<string, number> = {};
  if (c.bosTokenId !== undefined) ids.bos_token_id = c.bosTokenId;
  if (c.eosTokenId !== undefined) ids.eos_token_id = c.eosTokenId;
  if (c.padTokenId !== undefined) ids.pad_token_id = c.padTokenId;
  const common = {
    hidden_size: c.hiddenSize,
    num_hidden_layers: c.numLayers,
    vocab_size: c.vocabSize,
    state_size: c.stateSize,
    expand: c.intermediateSize / c.hiddenSize,
    intermediate_size: c.intermediateSize,
    conv_kernel: c.convKernel,
    layer_norm_epsilon: c.normEps,
    use_bias: c.useBias,
    use_conv_bias: c.useConvBias,
    hidden_act: "silu",
    residual_in_fp32: true,
    tie_word_embeddings: c.tieEmbeddings,
    ...ids,
  };
  if (c.architecture === "mamba1") {
    return {
      architectures: ["MambaForCausalLM"],
      model_type: "mamba",
      ...common,
      time_step_rank: c.timeStepRank,
      time_step_scale: 1.0,
      time_step_min: 0.001,
      time_step_max: 0.1,
      time_step_init_scheme: "random",
      time_step_floor: 1e-4,
    };
  }
  return {
    architectures: ["Mamba2ForCausalLM"],
    model_type: "mamba2",
    ...common,
    num_heads: c.numHeads,
    head_dim: c.headDim,
    n_groups: c.numGroups,
    chunk_size: c.chunkSize,
    rms_norm: true,
    norm_before_gate: c.normBeforeGate,
    time_step_limit: [...c.timeStepLimit],
    time_step_rank: "auto",
    time_step_min: 0.001,
    time_step_max: 0.1,
    time_step_floor: 1e-4,
  };
}

// ---------------------------------------------------------------------------------------------------
// Weights: shared checks and dtype policy

/** A weight as found in the file, before it becomes canonical. */
interface SourceWeight {
  tensor: Tensor;
  /** The name in the file, for messages. */
  source: string;
}

function disposeAll(tensors: Iterable<Tensor>): void {
  for (const t of tensors) if (!t.disposed) t.dispose();
}

/**
 * Checks every expected canonical weight is there with its shape, and applies the dtype policy:
 * matrices stay as stored (or become options.dtype), everything else becomes f32.
 */
function finishWeights(
  file: string,
  config: MambaConfig,
  found: Map<string, SourceWeight>,
  options: LoadCheckpointOptions,
): Map<string, Tensor> {
  const expected = expectedShapes(config);
  for (const [name, shape] of expected) {
    const w = found.get(name);
    if (!w) throw new Error(`${file}: missing tensor for ${name} (expected shape ${formatShape(shape)})`);
    if (formatShape(w.tensor.shape) !== formatShape(shape)) {
      throw new Error(`${file}: tensor "${w.source}" (${name}) has shape ${formatShape(w.tensor.shape)}, expected ${formatShape(shape)}`);
    }
  }
  const weights = new Map<string, Tensor>();
  for (const [name, w] of found) {
    if (!expected.has(name)) {
      w.tensor.dispose();
      continue;
    }
    let t = w.tensor;
    if (t.dtype === "i32") throw new Error(`${file}: tensor "${w.source}" (${name}) is i32; weights must be floating point`);
    let target: DType = "f32";
    if (isMatrixWeight(name)) {
      target = options.dtype ?? t.dtype;
      // q8_0 needs whole blocks of 32 along each row; narrower matrices (e.g. dt_proj of rank 48) stay f32.
      if (target === "q8_0" && t.shape[t.shape.length - 1] % 32 !== 0) target = t.dtype === "q8_0" ? "q8_0" : "f32";
    }
    if (t.dtype !== target) {
      const converted = t.to(target);
      t.dispose();
      t = converted;
    }
    weights.set(name, t);
  }
  return weights;
}

// ---------------------------------------------------------------------------------------------------
// Folders: Hugging Face and mamba_ssm

const LAYER_NAME = /^layers\.(\d+)\.(.+)$/;
const MIXER_NAMES: Record<string, string> = {
  "in_proj.weight": "in_proj",
  "in_proj.bias": "in_proj_bias",
  "conv1d.weight": "conv",
  "conv1d.bias": "conv_bias",
  "x_proj.weight": "x_proj",
  "dt_proj.weight": "dt_proj",
  "dt_proj.bias": "dt_bias",
  dt_bias: "dt_bias",
  A_log: "A",
  D: "D",
  "norm.weight": "ssm_norm",
  "out_proj.weight": "out_proj",
  "out_proj.bias": "out_proj_bias",
};

/** An MoE block's tensors under backbone.layers.{i}.moe. (the experts stacked: fc1 [E, 2·Hm, d]). */
const MOE_NAMES: Record<string, string> = {
  "router.weight": "router",
  "router.bias": "router_bias",
  "experts.fc1.weight": "fc1",
  "experts.fc1.bias": "fc1_bias",
  "experts.fc2.weight": "fc2",
  "experts.fc2.bias": "fc2_bias",
};

/** The canonical name of a Hugging Face / mamba_ssm tensor name, or undefined for tensors not used. */
function canonicalFolderName(name: string): string | undefined {
  if (name === "lm_head.weight") return "lm_head";
  const inner = name.startsWith("backbone.") ? name.slice("backbone.".length) : name;
  if (inner === "embeddings.weight" || inner === "embedding.weight") return "embeddings";
  if (inner === "norm_f.weight") return "norm_f";
  const m = LAYER_NAME.exec(inner);
  if (!m) return undefined;
  if (m[2] === "norm.weight") return `layers.${m[1]}.norm`;
  if (m[2].startsWith("moe.")) {
    const moe = MOE_NAMES[m[2].slice("moe.".length)];
    return moe ? `layers.${m[1]}.${moe}` : undefined;
  }
  if (!m[2].startsWith("mixer.")) return undefined;
  const mixer = MIXER_NAMES[m[2].slice("mixer.".length)];
  return mixer ? `layers.${m[1]}.${mixer}` : undefined;
}

/** -exp(A_log), computed in float64 and rounded once to f32. */
function aFromALog(aLog: Tensor): Tensor {
  const values = aLog.toArray();
  const a = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) a[i] = -Math.exp(values[i]);
  return Tensor.from(a, aLog.shape);
}

function loadFolderWeights(
  folder: string,
  configFile: string,
  config: MambaConfig,
  options: LoadCheckpointOptions,
): Map<string, Tensor> {
  const single = path.join(folder, "model.safetensors");
  const index = path.join(folder, "model.safetensors.index.json");
  let tensors: Map<string, Tensor>;
  let file: string;
  if (fs.existsSync(single)) {
    file = single;
    tensors = readSafetensors(single).tensors;
  } else if (fs.existsSync(index)) {
    file = index;
    tensors = readShardedSafetensors(index).tensors;
  } else {
    const bin = ["pytorch_model.bin", "pytorch_model.bin.index.json"].find((b) => fs.existsSync(path.join(folder, b)));
    if (bin) {
      throw new Error(
        `${folder}: the weights are in ${bin} (PyTorch pickle), which is not supported. Convert them to safetensors ` +
          `first, e.g. in Python: safetensors.torch.save_file(torch.load("${bin}"), "model.safetensors") ` +
          `(or save_pretrained(..., safe_serialization=True)).`,
      );
    }
    throw new Error(`${folder}: no weights found: expected model.safetensors or model.safetensors.index.json beside ${path.basename(configFile)}`);
  }
  const found = new Map<string, SourceWeight>();
  try {
    for (const [name, tensor] of tensors) {
      const canonical = canonicalFolderName(name);
      if (!canonical || found.has(canonical)) {
        tensor.dispose();
        continue;
      }
      let t = tensor;
      if (canonical.endsWith(".conv")) {
        // conv1d.weight is [channels, 1, K] (a depthwise Conv1d); canonical is [channels, K].
        if (t.shape.length !== 3 || t.shape[1] !== 1) {
          throw new Error(`${file}: tensor "${name}" has shape ${formatShape(t.shape)}, expected [channels, 1, kernel]`);
        }
        t = t.reshape([t.shape[0], t.shape[2]]);
      } else if (canonical.endsWith(".A")) {
        t = aFromALog(tensor);
        tensor.dispose();
      }
      found.set(canonical, { tensor: t, source: name });
    }
    const tiedInFile = !found.has("lm_head");
    if (tiedInFile || config.tieEmbeddings) {
      config.tieEmbeddings = true;
      found.get("lm_head")?.tensor.dispose();
      found.delete("lm_head");
    }
    return finishWeights(file, config, found, options);
  } catch (err) {
    disposeAll(tensors.values());
    for (const w of found.values()) if (!w.tensor.disposed) w.tensor.dispose();
    throw err;
  }
}

function readConfigJson(configFile: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(configFile, "utf8");
  } catch (err) {
    throw new Error(`${configFile}: cannot read (${(err as Error).message})`);
  }
  let json: unknown;
  try {
    json = parsePythonJson(text);
  } catch (err) {
    throw new Error(`${configFile}: not valid JSON (${(err as Error).message})`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) throw new Error(`${configFile}: must hold a JSON object`);
  return json as Record<string, unknown>;
}

function loadFolder(folder: string, options: LoadCheckpointOptions): Checkpoint {
  const configFile = path.join(folder, "config.json");
  if (!fs.existsSync(configFile)) {
    throw new Error(`${folder}: no config.json; expected a Hugging Face or mamba_ssm checkpoint folder (config.json + model.safetensors), or a .gguf file`);
  }
  const json = readConfigJson(configFile);
  const architectures = Array.isArray(json.architectures) ? (json.architectures as unknown[]) : [];
  let format: CheckpointFormat;
  let config: MambaConfig;
  if (
    ["mamba", "mamba2", "mamba_moe", "mamba2_moe"].includes(json.model_type as string) ||
    ["MambaForCausalLM", "Mamba2ForCausalLM", "MambaMoeForCausalLM", "Mamba2MoeForCausalLM"].some((a) => architectures.includes(a))
  ) {
    format = "hf";
    config = configFromHf(json, configFile);
  } else if ("d_model" in json || "n_layer" in json) {
    format = "mamba_ssm";
    config = configFromMambaSsm(json, configFile);
  } else {
    throw new Error(
      `${configFile}: not a Mamba config: model_type is ${JSON.stringify(json.model_type)}; expected "mamba" or "mamba2" ` +
        `(Hugging Face) or the d_model / n_layer fields of mamba_ssm`,
    );
  }
  const weights = loadFolderWeights(folder, configFile, config, options);
  const tokenizerFile = path.join(folder, "tokenizer.json");
  const checkpoint: Checkpoint = { config, weights, format, source: folder };
  if (fs.existsSync(tokenizerFile)) checkpoint.tokenizer = { kind: "tokenizer.json", path: tokenizerFile };
  return checkpoint;
}

// ---------------------------------------------------------------------------------------------------
// GGUF (llama.cpp's mamba / mamba2)

/** The shortest decimal that rounds to the same f32 (GGUF stores eps as f32: 1e-5, not 9.99999974e-6). */
function f32Decimal(v: number): number {
  for (let p = 1; p <= 9; p++) {
    const d = Number(v.toPrecision(p));
    if (Math.fround(d) === v) return d;
  }
  return v;
}

const GGUF_LAYER_NAMES: Record<string, string> = {
  "attn_norm.weight": "norm",
  "ssm_in.weight": "in_proj",
  "ssm_in.bias": "in_proj_bias",
  "ssm_conv1d.weight": "conv",
  "ssm_conv1d.bias": "conv_bias",
  "ssm_x.weight": "x_proj",
  "ssm_dt.weight": "dt_proj",
  "ssm_dt.bias": "dt_bias",
  ssm_a: "A",
  ssm_d: "D",
  "ssm_norm.weight": "ssm_norm",
  "ssm_out.weight": "out_proj",
  "ssm_out.bias": "out_proj_bias",
};

function ggufStrings(file: string, metadata: Map<string, GgufEntry>, key: string): string[] | undefined {
  const entry = metadata.get(key);
  if (!entry) return undefined;
  const array = entry.value as GgufArray;
  if (entry.type !== "array" || array.itemType !== "string") throw new Error(`GGUF ${file}: key "${key}" must be an array of strings`);
  return array.items as string[];
}

function ggufTokenizer(file: string, metadata: Map<string, GgufEntry>): TokenizerSource | undefined {
  const tokens = ggufStrings(file, metadata, "tokenizer.ggml.tokens");
  if (!tokens) return undefined;
  const source: TokenizerSource = { kind: "gguf", tokens, merges: ggufStrings(file, metadata, "tokenizer.ggml.merges") ?? [] };
  const types = metadata.get("tokenizer.ggml.token_type");
  if (types) {
    const array = types.value as GgufArray;
    if (types.type !== "array" || !array.items.every((x) => typeof x === "number")) {
      throw new Error(`GGUF ${file}: key "tokenizer.ggml.token_type" must be an array of integers`);
    }
    source.tokenTypes = array.items as number[];
  }
  if (metadata.has("tokenizer.ggml.bos_token_id")) source.bos = ggufNumber(file, metadata, "tokenizer.ggml.bos_token_id");
  if (metadata.has("tokenizer.ggml.eos_token_id")) source.eos = ggufNumber(file, metadata, "tokenizer.ggml.eos_token_id");
  if (metadata.has("tokenizer.ggml.model")) source.model = ggufString(file, metadata, "tokenizer.ggml.model");
  return source;
}

function loadGguf(file: string, options: LoadCheckpointOptions): Checkpoint {
  const { metadata, tensors } = readGguf(file);
  try {
    const arch = ggufString(file, metadata, "general.architecture");
    if (arch !== "mamba" && arch !== "mamba2") {
      throw new Error(`GGUF ${file}: general.architecture is "${arch}"; expected "mamba" or "mamba2"`);
    }
    const key = (k: string): number => ggufNumber(file, metadata, `${arch}.${k}`);
    const embeddings = tensors.get("token_embd.weight");
    if (!embeddings) throw new Error(`GGUF ${file}: missing tensor "token_embd.weight"`);
    const hiddenSize = key("embedding_length");
    const intermediateSize = key("ssm.inner_size");
    const optionalKey = <T>(k: string, read: (entry: GgufEntry) => T, fallback: T): T => {
      const entry = metadata.get(`${arch}.${k}`);
      return entry ? read(entry) : fallback;
    };
    const tokenId = (k: string): number | undefined =>
      metadata.has(`tokenizer.ggml.${k}`) ? ggufNumber(file, metadata, `tokenizer.ggml.${k}`) : undefined;
    const common = {
      hiddenSize,
      numLayers: key("block_count"),
      vocabSize: embeddings.shape[0],
      intermediateSize,
      stateSize: key("ssm.state_size"),
      convKernel: key("ssm.conv_kernel"),
      normEps: f32Decimal(key("attention.layer_norm_rms_epsilon")),
      useBias: tensors.has("blk.0.ssm_in.bias"),
      useConvBias: tensors.has("blk.0.ssm_conv1d.bias"),
      tieEmbeddings: !tensors.has("output.weight"),
    };
    let config: MambaConfig;
    if (arch === "mamba") {
      config = { architecture: "mamba1", ...common, timeStepRank: key("ssm.time_step_rank"), numHeads: 0, headDim: 0, numGroups: 0, chunkSize: 0, timeStepLimit: [0, Infinity], normBeforeGate: false };
    } else {
      const numHeads = key("ssm.time_step_rank");
      if (intermediateSize % numHeads !== 0) {
        throw new Error(`GGUF ${file}: ${arch}.ssm.inner_size (${intermediateSize}) is not a multiple of ${arch}.ssm.time_step_rank (heads, ${numHeads})`);
      }
      // chunk_size, time_step_limit and norm_before_gate are not llama.cpp keys; this library writes them
      // when they differ from the defaults llama.cpp assumes.
      const limit = optionalKey<[number, number]>("ssm.time_step_limit", (e) => {
        const items = (e.value as GgufArray).items;
        if (e.type !== "array" || items.length !== 2 || !items.every((x) => typeof x === "number")) {
          throw new Error(`GGUF ${file}: key "${arch}.ssm.time_step_limit" must be an array of two numbers`);
        }
        return [f32Decimal(items[0] as number), f32Decimal(items[1] as number)];
      }, [0, Infinity]);
      config = {
        architecture: "mamba2",
        ...common,
        timeStepRank: 0,
        numHeads,
        headDim: intermediateSize / numHeads,
        numGroups: key("ssm.group_count"),
        chunkSize: optionalKey("ssm.chunk_size", () => key("ssm.chunk_size"), 256),
        timeStepLimit: limit,
        normBeforeGate: optionalKey("ssm.norm_before_gate", (e) => e.value === true, false),
      };
      checkHeads(file, config, `${arch}.ssm.time_step_rank`, "head size");
    }
    const bos = tokenId("bos_token_id"), eos = tokenId("eos_token_id"), pad = tokenId("padding_token_id");
    if (bos !== undefined) config.bosTokenId = bos;
    if (eos !== undefined) config.eosTokenId = eos;
    if (pad !== undefined) config.padTokenId = pad;

    const found = new Map<string, SourceWeight>();
    const mamba2 = config.architecture === "mamba2";
    for (const [name, tensor] of tensors) {
      let canonical: string | undefined;
      if (name === "token_embd.weight") canonical = "embeddings";
      else if (name === "output_norm.weight") canonical = "norm_f";
      else if (name === "output.weight") canonical = "lm_head";
      else {
        const m = /^blk\.(\d+)\.(.+)$/.exec(name);
        const suffix = m ? GGUF_LAYER_NAMES[m[2]] : undefined;
        if (m && suffix) canonical = `layers.${m[1]}.${suffix}`;
      }
      if (!canonical) continue;
      let t = tensor;
      // Mamba-2 keeps A and D as [H, 1] and the gated norm's weight as [G, d_inner / G]; canonical is flat.
      if (mamba2 && /\.(A|D|ssm_norm)$/.test(canonical) && t.shape.length === 2) t = t.reshape([t.size]);
      found.set(canonical, { tensor: t, source: name });
    }
    const used = new Set([...found.values()].map((w) => w.source));
    for (const [name, tensor] of tensors) if (!used.has(name)) tensor.dispose();
    const weights = finishWeights(file, config, found, options);
    const checkpoint: Checkpoint = { config, weights, format: "gguf", source: file };
    const tokenizer = ggufTokenizer(file, metadata);
    if (tokenizer) checkpoint.tokenizer = tokenizer;
    return checkpoint;
  } catch (err) {
    disposeAll(tensors.values());
    throw err;
  }
}

/**
 * Loads a checkpoint: a Hugging Face or mamba_ssm folder (or its config.json), or a .gguf file. Weights
 * come back under the canonical names, mapped from the file where no conversion is needed; dispose()
 * them (or let them be collected) to release the mapping.
 */
export function loadCheckpoint(checkpointPath: string, options: LoadCheckpointOptions = {}): Checkpoint {
  if (options.dtype !== undefined && !WEIGHT_DTYPES.includes(options.dtype)) {
    throw new Error(`loadCheckpoint: dtype must be one of ${WEIGHT_DTYPES.join(", ")}, got ${JSON.stringify(options.dtype)}`);
  }
  let stat: fs.Stats;
  try {
    stat = fs.statSync(checkpointPath);
  } catch {
    throw new Error(`${checkpointPath}: no such file or folder`);
  }
  if (stat.isDirectory()) return loadFolder(checkpointPath, options);
  if (path.basename(checkpointPath) === "config.json") return loadFolder(path.dirname(checkpointPath), options);
  const magic = Buffer.alloc(4);
  const fd = fs.openSync(checkpointPath, "r");
  try {
    fs.readSync(fd, magic, 0, 4, 0);
  } finally {
    fs.closeSync(fd);
  }
  if (magic.toString("latin1") === "GGUF") return loadGguf(checkpointPath, options);
  if (checkpointPath.endsWith(".safetensors") && fs.existsSync(path.join(path.dirname(checkpointPath), "config.json"))) {
    return loadFolder(path.dirname(checkpointPath), options);
  }
  throw new Error(`${checkpointPath}: not a GGUF file (no "GGUF" magic) nor a checkpoint folder with config.json`);
}

// ---------------------------------------------------------------------------------------------------
// Saving

interface SaveInput {
  config: MambaConfig;
  weights: Map<string, Tensor>;
  tokenizer?: TokenizerSource;
}

/** Checks the weights against the config before anything is written. */
function checkWeightsToSave(where: string, config: MambaConfig, weights: Map<string, Tensor>): void {
  for (const [name, shape] of expectedShapes(config)) {
    const t = weights.get(name);
    if (!t) throw new Error(`${where}: weight ${name} is missing (expected shape ${formatShape(shape)})`);
    if (formatShape(t.shape) !== formatShape(shape)) {
      throw new Error(`${where}: weight ${name} has shape ${formatShape(t.shape)}, expected ${formatShape(shape)}`);
    }
    t.buffer(`${where}: weight ${name}`);
  }
}

/** The tensor in `dtype`, converting when needed; `temporaries` collects the copies made. */
function asDType(t: Tensor, dtype: DType, temporaries: Tensor[]): Tensor {
  if (t.dtype === dtype) return t;
  const c = t.to(dtype);
  temporaries.push(c);
  return c;
}

function hfName(name: string, config: MambaConfig): string {
  if (name === "embeddings") return "backbone.embeddings.weight";
  if (name === "norm_f") return "backbone.norm_f.weight";
  if (name === "lm_head") return "lm_head.weight";
  const m = LAYER_NAME.exec(name);
  if (!m) throw new Error(`saveCheckpoint: unknown weight name ${name}`);
  const base = `backbone.layers.${m[1]}.`;
  const moe = Object.entries(MOE_NAMES).find(([, canonical]) => canonical === m[2]);
  if (moe) return base + "moe." + moe[0];
  const mixer: Record<string, string> = {
    norm: "norm.weight",
    in_proj: "mixer.in_proj.weight",
    in_proj_bias: "mixer.in_proj.bias",
    conv: "mixer.conv1d.weight",
    conv_bias: "mixer.conv1d.bias",
    x_proj: "mixer.x_proj.weight",
    dt_proj: "mixer.dt_proj.weight",
    // Mamba-1 keeps Δ's bias in dt_proj; Mamba-2 has a separate dt_bias per head.
    dt_bias: config.architecture === "mamba1" ? "mixer.dt_proj.bias" : "mixer.dt_bias",
    A: "mixer.A_log",
    D: "mixer.D",
    ssm_norm: "mixer.norm.weight",
    out_proj: "mixer.out_proj.weight",
    out_proj_bias: "mixer.out_proj.bias",
  };
  if (!(m[2] in mixer)) throw new Error(`saveCheckpoint: unknown weight name ${name}`);
  return base + mixer[m[2]];
}

function saveHfFolder(folder: string, input: SaveInput, dtype: WeightDType | undefined): void {
  if (dtype === "q8_0") {
    throw new Error(`saveCheckpoint ${folder}: q8_0 is not a safetensors dtype; save as "gguf" for q8_0, or choose f32, f16 or bf16`);
  }
  const { config, weights } = input;
  checkWeightsToSave(`saveCheckpoint ${folder}`, config, weights);
  if (fs.existsSync(folder) && !fs.statSync(folder).isDirectory()) {
    throw new Error(`saveCheckpoint ${folder}: exists and is not a folder; the safetensors format writes a Hugging Face folder`);
  }
  fs.mkdirSync(folder, { recursive: true });
  const temporaries: Tensor[] = [];
  try {
    const out = new Map<string, Tensor>();
    for (const name of expectedShapes(config).keys()) {
      const t = weights.get(name) as Tensor;
      let stored: Tensor;
      if (isMatrixWeight(name)) {
        stored = asDType(t, dtype ?? (t.dtype === "q8_0" ? "f32" : t.dtype), temporaries);
      } else if (name.endsWith(".A")) {
        // A_log = log(-A): computed in float64, rounded once to f32.
        const a = t.toArray();
        const aLog = new Float32Array(a.length);
        for (let i = 0; i < a.length; i++) {
          if (!(a[i] < 0)) throw new Error(`saveCheckpoint ${folder}: weight ${name}[${i}] is ${a[i]}; A must be negative (A = -exp(A_log))`);
          aLog[i] = Math.log(-a[i]);
        }
        stored = Tensor.from(aLog, t.shape);
        temporaries.push(stored);
      } else {
        stored = asDType(t, "f32", temporaries);
        if (name.endsWith(".conv")) stored = stored.reshape([stored.shape[0], 1, stored.shape[1]]);
      }
      out.set(hfName(name, config), stored);
    }
    // transformers refuses safetensors files whose metadata lacks format "pt".
    writeSafetensors(path.join(folder, "model.safetensors"), out, { format: "pt" });
  } finally {
    disposeAll(temporaries);
  }
  writeBytesAtomic(path.join(folder, "config.json"), stringifyPythonJson(hfConfigJson(config)) + "\n");
  writeTokenizerJson(folder, input.tokenizer);
}

/** Copies tokenizer.json, or builds a byte-level BPE tokenizer.json from GGUF tables. */
function writeTokenizerJson(folder: string, tokenizer: TokenizerSource | undefined): void {
  if (!tokenizer) return;
  const destination = path.join(folder, "tokenizer.json");
  if (tokenizer.kind === "tokenizer.json") {
    if (path.resolve(tokenizer.path) === path.resolve(destination)) return;
    writeBytesAtomic(destination, fs.readFileSync(tokenizer.path));
    return;
  }
  if (tokenizer.model !== undefined && tokenizer.model !== "gpt2") {
    throw new Error(`saveCheckpoint ${folder}: the GGUF tokenizer is "${tokenizer.model}"; only "gpt2" (byte-level BPE) can be written as tokenizer.json`);
  }
  const json = ggufVocabToTokenizerJson(tokenizer, { source: `saveCheckpoint ${folder}` });
  writeBytesAtomic(destination, JSON.stringify(json) + "\n");
}

/** tokenizer.ggml.* key/values from a tokenizer source, padded to the vocabulary as llama.cpp's converter pads. */
function ggufTokenizerEntries(where: string, tokenizer: TokenizerSource, vocabSize: number): Array<[string, GgufEntry]> {
  let tokens: string[];
  let types: number[];
  let merges: string[];
  let model = "gpt2";
  if (tokenizer.kind === "tokenizer.json") {
    let json: unknown;
    try {
      json = JSON.parse(fs.readFileSync(tokenizer.path, "utf8"));
    } catch (err) {
      throw new Error(`${where}: cannot read ${tokenizer.path} (${(err as Error).message})`);
    }
    const vocab = tokenizerJsonToGgufVocab(json as TokenizerJson, { source: tokenizer.path });
    ({ tokens, tokenTypes: types, merges } = vocab);
  } else {
    tokens = [...tokenizer.tokens];
    types = tokenizer.tokenTypes ? [...tokenizer.tokenTypes] : tokens.map(() => 1);
    merges = tokenizer.merges;
    model = tokenizer.model ?? "gpt2";
  }
  if (tokens.length > vocabSize) {
    throw new Error(`${where}: the tokenizer has ${tokens.length} tokens, more than the ${vocabSize} rows of the embedding`);
  }
  for (let i = 0; i < vocabSize; i++) {
    if (tokens[i] === undefined) {
      tokens[i] = `[PAD${i}]`;
      types[i] = 5;
    }
  }
  const entries: Array<[string, GgufEntry]> = [
    ["tokenizer.ggml.model", gguf.string(model)],
    ["tokenizer.ggml.tokens", gguf.array("string", tokens)],
    ["tokenizer.ggml.token_type", gguf.array("i32", types)],
  ];
  if (merges.length) entries.push(["tokenizer.ggml.merges", gguf.array("string", merges)]);
  return entries;
}

/** llama_ftype of the matrices, for general.file_type. */
function fileType(dtype: DType): number {
  return { f32: 0, f16: 1, q8_0: 7, bf16: 32, i32: 0 }[dtype];
}

function ggufName(name: string): string {
  if (name === "embeddings") return "token_embd.weight";
  if (name === "norm_f") return "output_norm.weight";
  if (name === "lm_head") return "output.weight";
  const m = LAYER_NAME.exec(name) as RegExpExecArray;
  const suffix = Object.entries(GGUF_LAYER_NAMES).find(([, canonical]) => canonical === m[2]);
  if (!suffix) throw new Error(`saveCheckpoint: unknown weight name ${name}`);
  return `blk.${m[1]}.${suffix[0]}`;
}

function saveGgufFile(file: string, input: SaveInput, dtype: WeightDType | undefined): void {
  const { config, weights } = input;
  const where = `saveCheckpoint ${file}`;
  if (config.moe) {
    throw new Error(`${where}: GGUF has no mixture-of-experts Mamba architecture (llama.cpp runs mamba and mamba2 only); save this model as "safetensors"`);
  }
  checkWeightsToSave(where, config, weights);
  const arch = config.architecture === "mamba1" ? "mamba" : "mamba2";
  const temporaries: Tensor[] = [];
  try {
    const tensors: Array<[string, Tensor]> = [];
    let matrixDType: DType = dtype ?? (weights.get("embeddings") as Tensor).dtype;
    for (const name of expectedShapes(config).keys()) {
      const t = weights.get(name) as Tensor;
      let stored: Tensor;
      if (isMatrixWeight(name)) {
        let target: DType = dtype ?? t.dtype;
        // As llama.cpp's converter: rows that are not whole q8_0 blocks fall back to F16.
        if (target === "q8_0" && t.shape[t.shape.length - 1] % 32 !== 0) target = "f16";
        stored = asDType(t, target, temporaries);
        if (name === "embeddings") matrixDType = target;
      } else {
        // llama.cpp keeps norms, biases, conv, ssm_a and ssm_d in F32.
        stored = asDType(t, "f32", temporaries);
        if (config.architecture === "mamba2") {
          if (name.endsWith(".A") || name.endsWith(".D")) stored = stored.reshape([config.numHeads, 1]);
          if (name.endsWith(".ssm_norm")) stored = stored.reshape([config.numGroups, config.intermediateSize / config.numGroups]);
        }
      }
      tensors.push([ggufName(name), stored]);
    }
    const c = config;
    const metadata: Array<[string, GgufEntry]> = [
      ["general.architecture", gguf.string(arch)],
      ["general.file_type", gguf.u32(fileType(matrixDType))],
      [`${arch}.context_length`, gguf.u32(1 << 20)],
      [`${arch}.embedding_length`, gguf.u32(c.hiddenSize)],
      [`${arch}.feed_forward_length`, gguf.u32(0)],
      [`${arch}.attention.head_count`, gguf.u32(0)],
      [`${arch}.block_count`, gguf.u32(c.numLayers)],
      [`${arch}.ssm.conv_kernel`, gguf.u32(c.convKernel)],
      [`${arch}.ssm.inner_size`, gguf.u32(c.intermediateSize)],
      [`${arch}.ssm.state_size`, gguf.u32(c.stateSize)],
      [`${arch}.ssm.time_step_rank`, gguf.u32(c.architecture === "mamba1" ? c.timeStepRank : c.numHeads)],
      [`${arch}.attention.layer_norm_rms_epsilon`, gguf.f32(c.normEps)],
    ];
    if (c.architecture === "mamba2") {
      metadata.push([`${arch}.ssm.group_count`, gguf.u32(c.numGroups)]);
      if (c.chunkSize !== 256) metadata.push([`${arch}.ssm.chunk_size`, gguf.u32(c.chunkSize)]);
      if (c.timeStepLimit[0] !== 0 || c.timeStepLimit[1] !== Infinity) {
        metadata.push([`${arch}.ssm.time_step_limit`, gguf.array("f32", [...c.timeStepLimit])]);
      }
      if (c.normBeforeGate) metadata.push([`${arch}.ssm.norm_before_gate`, gguf.bool(true)]);
    }
    if (input.tokenizer) metadata.push(...ggufTokenizerEntries(where, input.tokenizer, c.vocabSize));
    if (c.bosTokenId !== undefined) metadata.push(["tokenizer.ggml.bos_token_id", gguf.u32(c.bosTokenId)]);
    if (c.eosTokenId !== undefined) metadata.push(["tokenizer.ggml.eos_token_id", gguf.u32(c.eosTokenId)]);
    if (c.padTokenId !== undefined) metadata.push(["tokenizer.ggml.padding_token_id", gguf.u32(c.padTokenId)]);
    writeGguf(file, metadata, tensors);
  } finally {
    disposeAll(temporaries);
  }
}

/**
 * Saves a checkpoint. "safetensors": `checkpointPath` is a folder that gets config.json (Hugging Face
 * Mamba / Mamba-2 form), model.safetensors (Hugging Face names, A_log = log(-A), conv1d [C, 1, K], no
 * lm_head when tied) and tokenizer.json when a tokenizer is given. "gguf": one file in llama.cpp's
 * layout. Every file is written to a temporary file and renamed into place.
 */
export function saveCheckpoint(checkpointPath: string, input: SaveInput, options: SaveCheckpointOptions): void {
  if (options.dtype !== undefined && !WEIGHT_DTYPES.includes(options.dtype)) {
    throw new Error(`saveCheckpoint: dtype must be one of ${WEIGHT_DTYPES.join(", ")}, got ${JSON.stringify(options.dtype)}`);
  }
  if (options.format === "safetensors") return saveHfFolder(checkpointPath, input, options.dtype);
  if (options.format === "gguf") return saveGgufFile(checkpointPath, input, options.dtype);
  throw new Error(`saveCheckpoint: format must be "safetensors" or "gguf", got ${JSON.stringify(options.format)}`);
}
