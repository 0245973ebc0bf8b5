// train(): a byte-level Mamba language model trained on a text file, from scratch or from a
// checkpoint, with AdamW, warmup + cosine learning rates, gradient accumulation and clipping,
// periodic evaluation on a held-out split, atomic checkpoints that a later run resumes exactly, and
// the loss curve as CSV and SVG.
//
// The output folder holds:
//   model/        the latest checkpoint: a Hugging Face folder (config.json, model.safetensors) that
//                 loadModel() and `mamba-ssm generate --model` read, plus optimizer.safetensors (the
//                 trainer's exact parameters and AdamW moments) and trainer.json (step, sampler
//                 position, options, loss history) for --resume
//   loss.csv, loss.svg
// A checkpoint is written into a temporary folder and renamed into place, so a run killed while
// writing leaves the previous checkpoint whole.
import * as fs from "fs";
import * as path from "path";

import { loadCheckpoint, saveCheckpoint } from "../io/checkpoint";
import { readSafetensors, writeSafetensors } from "../io/safetensors";
import { writeBytesAtomic } from "../io/atomic";
import { MambaConfig, MoeConfig } from "../models/config";
import { initWeights } from "../models/init";
import { Tensor } from "../tensor";
import { BatchSampler, ByteDataset, evaluationBatches, SamplerPosition } from "./data";
import { LossPoint, writeLossFiles } from "./plot";
import { ProgressBar } from "./progress";
import { checkSchedule, learningRate } from "./schedule";
import { Trainer } from "./trainer";

/** The model to train from scratch: byte-level (vocabulary 256), sizes as in lib/models/config.ts. */
export interface TrainModelOptions {
  architecture?: "mamba1" | "mamba2";
  hiddenSize?: number;
  numLayers?: number;
  stateSize?: number;
  /** intermediateSize = expand · hiddenSize (default 2) */
  expand?: number;
  convKernel?: number;
  /** Mamba-1: rank of Δ (default ceil(hiddenSize / 16)) */
  timeStepRank?: number;
  /** Mamba-2: head size (default 32) and B/C groups (default 1) */
  headDim?: number;
  numGroups?: number;
  chunkSize?: number;
  /**
   * Mixture-of-experts blocks (BlackMamba): with this many experts, every second layer (1, 3, …) is
   * an MoE-MLP block instead of a Mamba layer. 0 (the default): none.
   */
  moeExperts?: number;
  /** Experts per token (default 1). */
  moeTopK?: number;
  /** Each expert's GLU width (default 2 · hiddenSize). */
  moeHiddenSize?: number;
}

export interface TrainOptions {
  /** A text file of training data (bytes). */
  data: string;
  /** Output folder (created). */
  out: string;
  /** Model sizes for a fresh model (ignored when `init` or `resume` gives the model). */
  model?: TrainModelOptions;
  /** Start from this checkpoint's weights (fine-tuning) instead of a fresh initialisation. */
  init?: string;
  /** Continue the run saved in `out` (its options win over the ones given here, except steps). */
  resume?: boolean;
  steps?: number;
  batchSize?: number;
  /** Tokens (bytes) per sequence. */
  length?: number;
  /** Micro-batches per optimizer step. */
  gradAccumulation?: number;
  lr?: number;
  minLr?: number;
  warmupSteps?: number;
  weightDecay?: number;
  beta1?: number;
  beta2?: number;
  maxGradNorm?: number;
  /** Weight of the MoE blocks' load-balancing loss (default 0.01; models without MoE blocks ignore it). */
  auxWeight?: number;
  /** Evaluate every this many steps (0: only at the end). */
  evalEvery?: number;
  /** Validation batches per evaluation. */
  evalBatches?: number;
  /** Checkpoint every this many steps (0: only at the end). */
  saveEvery?: number;
  validationFraction?: number;
  seed?: number;
  /** Where progress goes (default process.stderr); null for none. */
  progress?: NodeJS.WritableStream | null;
  /** Called after every step. Returning false stops the run after a checkpoint. */
  onStep?: (point: LossPoint) => boolean | void;
}

export interface TrainResult {
  out: string;
  /** The checkpoint folder (loadModel reads it). */
  model: string;
  steps: number;
  trainLoss: number;
  evalLoss?: number;
  tokensPerSecond: number;
  points: LossPoint[];
  /** True when the run stopped early (onStep returned false). */
  stopped: boolean;
}

/** The options a run is fixed by; kept in trainer.json so a resumed run continues the same one. */
interface RunSettings {
  config: MambaConfig;
  steps: number;
  batchSize: number;
  length: number;
  gradAccumulation: number;
  lr: number;
  minLr: number;
  warmupSteps: number;
  weightDecay: number;
  beta1: number;
  beta2: number;
  maxGradNorm: number;
  /** Absent in runs saved before MoE training existed (then 0.01). */
  auxWeight?: number;
  evalEvery: number;
  evalBatches: number;
  saveEvery: number;
  validationFraction: number;
  seed: number;
  data: string;
}

interface SavedRun {
  version: 1;
  settings: RunSettings;
  step: number;
  sampler: SamplerPosition;
  points: LossPoint[];
  tokens: number;
}

const RUN_FILE = "trainer.json";
const OPTIMIZER_FILE = "optimizer.safetensors";

function positiveInteger(value: number | undefined, fallback: number, name: string, min = 1): number {
  const v = value ?? fallback;
  if (!Number.isInteger(v) || v < min) throw new RangeError(`train: ${name} must be an integer >= ${min}, got ${value}`);
  return v;
}

function finiteIn(value: number | undefined, fallback: number, name: string, lo: number, hi: number): number {
  const v = value ?? fallback;
  if (typeof v !== "number" || !(v >= lo && v <= hi)) {
    throw new RangeError(`train: ${name} must be a number in [${lo}, ${hi}], got ${value}`);
  }
  return v;
}

/** The configuration of a fresh byte-level model. */
export function trainConfig(m: TrainModelOptions = {}): MambaConfig {
  const architecture = m.architecture ?? "mamba1";
  if (architecture !== "mamba1" && architecture !== "mamba2") {
    throw new RangeError(`train: architecture must be "mamba1" or "mamba2", got ${JSON.stringify(architecture)}`);
  }
  const hiddenSize = positiveInteger(m.hiddenSize, 128, "hiddenSize");
  const expand = positiveInteger(m.expand, 2, "expand");
  const intermediateSize = expand * hiddenSize;
  const numLayers = positiveInteger(m.numLayers, 4, "numLayers");
  const moeExperts = positiveInteger(m.moeExperts, 0, "moeExperts", 0);
  let moe: MoeConfig | undefined;
  if (moeExperts > 0) {
    if (numLayers < 2) throw new RangeError("train: an MoE model alternates Mamba and MoE layers, so it needs numLayers >= 2");
    const topK = positiveInteger(m.moeTopK, 1, "moeTopK");
    if (topK > moeExperts) throw new RangeError(`train: moeTopK ${topK} exceeds moeExperts ${moeExperts}`);
    moe = {
      layers: Array.from({ length: Math.floor(numLayers / 2) }, (_v, i) => 2 * i + 1),
      numExperts: moeExperts,
      topK,
      hiddenSize: positiveInteger(m.moeHiddenSize, 2 * hiddenSize, "moeHiddenSize"),
      scoring: "softmax",
      renormalize: true,
      activation: "silu",
      bias: false,
    };
  } else if (m.moeTopK !== undefined || m.moeHiddenSize !== undefined) {
    throw new RangeError("train: moeTopK and moeHiddenSize need moeExperts");
  }
  const common = {
    architecture,
    hiddenSize,
    numLayers,
    ...(moe ? { moe } : {}),
    vocabSize: 256,
    intermediateSize,
    convKernel: positiveInteger(m.convKernel, 4, "convKernel"),
    useBias: false,
    useConvBias: true,
    normEps: 1e-5,
    timeStepLimit: [0, Infinity] as [number, number],
    normBeforeGate: false,
    tieEmbeddings: true,
  };
  if (architecture === "mamba1") {
    return {
      ...common,
      stateSize: positiveInteger(m.stateSize, 16, "stateSize"),
      timeStepRank: positiveInteger(m.timeStepRank, Math.ceil(hiddenSize / 16), "timeStepRank"),
      numHeads: 0,
      headDim: 0,
      numGroups: 1,
      chunkSize: 256,
    };
  }
  const headDim = positiveInteger(m.headDim, 32, "headDim");
  if (intermediateSize % headDim !== 0) {
    throw new RangeError(`train: expand · hiddenSize (${intermediateSize}) must be a multiple of headDim ${headDim}`);
  }
  const numHeads = intermediateSize / headDim;
  const numGroups = positiveInteger(m.numGroups, 1, "numGroups");
  if (numHeads % numGroups !== 0) throw new RangeError(`train: the ${numHeads} heads must be a multiple of numGroups ${numGroups}`);
  return {
    ...common,
    stateSize: positiveInteger(m.stateSize, 64, "stateSize"),
    timeStepRank: 0,
    numHeads,
    headDim,
    numGroups,
    chunkSize: positiveInteger(m.chunkSize, 64, "chunkSize"),
  };
}

function settingsFrom(options: TrainOptions, config: MambaConfig): RunSettings {
  const steps = positiveInteger(options.steps, 1000, "steps");
  const lr = finiteIn(options.lr, 1e-3, "lr", 1e-12, 10);
  const s: RunSettings = {
    config,
    steps,
    batchSize: positiveInteger(options.batchSize, 8, "batchSize"),
    length: positiveInteger(options.length, 256, "length"),
    gradAccumulation: positiveInteger(options.gradAccumulation, 1, "gradAccumulation"),
    lr,
    minLr: finiteIn(options.minLr, lr / 10, "minLr", 0, lr),
    warmupSteps: positiveInteger(options.warmupSteps, Math.min(100, Math.floor(steps / 10)), "warmupSteps", 0),
    weightDecay: finiteIn(options.weightDecay, 0.1, "weightDecay", 0, 100),
    beta1: finiteIn(options.beta1, 0.9, "beta1", 0, 0.999999),
    beta2: finiteIn(options.beta2, 0.95, "beta2", 0, 0.99999999),
    maxGradNorm: finiteIn(options.maxGradNorm, 1, "maxGradNorm", 0, 1e30),
    auxWeight: finiteIn(options.auxWeight, 0.01, "auxWeight", 0, 1e6),
    evalEvery: positiveInteger(options.evalEvery, Math.max(1, Math.floor(steps / 10)), "evalEvery", 0),
    evalBatches: positiveInteger(options.evalBatches, 8, "evalBatches"),
    saveEvery: positiveInteger(options.saveEvery, Math.max(1, Math.floor(steps / 4)), "saveEvery", 0),
    validationFraction: finiteIn(options.validationFraction, 0.05, "validationFraction", 0, 0.5),
    seed: positiveInteger(options.seed, 0, "seed", 0),
    data: path.resolve(options.data),
  };
  checkSchedule({ lr: s.lr, warmupSteps: s.warmupSteps, totalSteps: s.steps, minLr: s.minLr });
  return s;
}

/** The checkpoint folder to resume from: `model`, or `model.old` when a run died between two renames. */
function findCheckpoint(out: string): string | null {
  for (const name of ["model", "model.old"]) {
    const dir = path.join(out, name);
    if (fs.existsSync(path.join(dir, RUN_FILE)) && fs.existsSync(path.join(dir, OPTIMIZER_FILE))) return dir;
  }
  return null;
}

function writeCheckpoint(out: string, trainer: Trainer, run: SavedRun): string {
  const final = path.join(out, "model");
  const temporary = path.join(out, `model.tmp-${process.pid}`);
  fs.rmSync(temporary, { recursive: true, force: true });
  fs.mkdirSync(temporary, { recursive: true });
  const weights = trainer.weights();
  try {
    saveCheckpoint(temporary, { config: trainer.config as MambaConfig, weights }, { format: "safetensors" });
  } finally {
    for (const t of weights.values()) t.dispose();
  }
  const state = new Map<string, Tensor>();
  for (const which of ["params", "m", "v"] as const) state.set(which, Tensor.from(trainer.read(which), [trainer.floats]));
  try {
    writeSafetensors(path.join(temporary, OPTIMIZER_FILE), state, { step: String(trainer.step) });
  } finally {
    for (const t of state.values()) t.dispose();
  }
  writeBytesAtomic(path.join(temporary, RUN_FILE), JSON.stringify(run, (_k, v) => (v === Infinity ? "Infinity" : v), 1));
  // Swap: the old checkpoint stays whole until the new one is in place.
  // (When `final` is missing, a run died between the two renames and model.old is the last whole
  // checkpoint: it stays until the new one is in place.)
  const old = path.join(out, "model.old");
  if (fs.existsSync(final)) {
    fs.rmSync(old, { recursive: true, force: true });
    fs.renameSync(final, old);
  }
  fs.renameSync(temporary, final);
  fs.rmSync(old, { recursive: true, force: true });
  return final;
}

function readRun(dir: string): SavedRun {
  const file = path.join(dir, RUN_FILE);
  let run: SavedRun;
  try {
    run = JSON.parse(fs.readFileSync(file, "utf8"), (_k, v) => (v === "Infinity" ? Infinity : v));
  } catch (e) {
    throw new Error(`train: cannot resume from ${file}: ${(e as Error).message}`);
  }
  if (run.version !== 1 || !run.settings || typeof run.step !== "number") {
    throw new Error(`train: ${file} is not a trainer state this version can resume`);
  }
  return run;
}

async function evaluate(trainer: Trainer, data: Uint8Array, s: RunSettings): Promise<number | undefined> {
  if (data.length < s.length + 1) return undefined;
  let sum = 0, count = 0;
  for (const b of evaluationBatches(data, s.batchSize, s.length, s.evalBatches)) {
    const r = await trainer.forwardBackward(b.ids, b.targets, b.rows, s.length, { backward: false });
    sum += r.sum;
    count += r.count;
  }
  return count ? sum / count : undefined;
}

/** Trains a model (see the file's comment for what is written where). */
export async function train(options: TrainOptions): Promise<TrainResult> {
  if (!options || typeof options.data !== "string") throw new Error("train: options.data (a text file) is required");
  if (typeof options.out !== "string" || !options.out) throw new Error("train: options.out (an output folder) is required");
  const out = path.resolve(options.out);
  fs.mkdirSync(out, { recursive: true });
  for (const name of fs.readdirSync(out)) {
    if (name.startsWith("model.tmp-")) fs.rmSync(path.join(out, name), { recursive: true, force: true });
  }

  let settings: RunSettings;
  let startWeights: Map<string, Tensor> | null = null;
  let saved: SavedRun | null = null;
  let checkpointDir: string | null = null;
  if (options.resume) {
    checkpointDir = findCheckpoint(out);
    if (!checkpointDir) throw new Error(`train: nothing to resume in ${out} (no model/${RUN_FILE} with ${OPTIMIZER_FILE})`);
    saved = readRun(checkpointDir);
    settings = { ...saved.settings, steps: options.steps ?? saved.settings.steps };
    checkSchedule({ lr: settings.lr, warmupSteps: settings.warmupSteps, totalSteps: settings.steps, minLr: settings.minLr });
  } else if (options.init) {
    // The checkpoint to fine-tune gives the configuration and the starting weights (disposed below).
    const ckpt = loadCheckpoint(options.init);
    startWeights = ckpt.weights;
    try {
      if (ckpt.config.vocabSize < 256) {
        throw new Error(`train: ${options.init} has a vocabulary of ${ckpt.config.vocabSize}; byte-level training needs at least 256`);
      }
      settings = settingsFrom(options, ckpt.config);
    } catch (e) {
      disposeWeights(startWeights);
      throw e;
    }
  } else {
    settings = settingsFrom(options, trainConfig(options.model));
  }

  let created: Trainer | null = null;
  try {
    const dataset = ByteDataset.fromFile(settings.data, { validationFraction: settings.validationFraction });
    const trainer = (created = new Trainer(settings.config, { auxWeight: settings.auxWeight ?? 0.01 }));
    let sampler: BatchSampler;
    const points: LossPoint[] = saved ? saved.points : [];
    let tokens = saved ? saved.tokens : 0;
    if (saved && checkpointDir) {
      const state = readSafetensors(path.join(checkpointDir, OPTIMIZER_FILE)).tensors;
      for (const which of ["params", "m", "v"] as const) {
        const t = state.get(which);
        if (!t || t.size !== trainer.floats) {
          throw new Error(`train: ${path.join(checkpointDir, OPTIMIZER_FILE)}: "${which}" is missing or not ${trainer.floats} floats`);
        }
        trainer.write(which, (t.data as Float32Array).slice(), which === "params" ? saved.step : undefined);
      }
      sampler = BatchSampler.resume(dataset.train, settings.batchSize, settings.length, saved.sampler);
    } else {
      if (!startWeights) startWeights = initWeights(settings.config, { seed: settings.seed });
      trainer.loadWeights(startWeights);
      disposeWeights(startWeights);
      startWeights = null;
      sampler = new BatchSampler(dataset.train, settings.batchSize, settings.length, settings.seed);
    }

    const schedule = { lr: settings.lr, warmupSteps: settings.warmupSteps, totalSteps: settings.steps, minLr: settings.minLr };
    const stream = options.progress === undefined ? process.stderr : options.progress;
    const bar = stream ? new ProgressBar({ total: settings.steps, stream, start: trainer.step }) : null;
    const tokensPerStep = settings.batchSize * settings.length * settings.gradAccumulation;
    const started = Date.now();
    let runTokens = 0;
    let lastTrain = NaN;
    let lastEval: number | undefined;
    let stopped = false;
    let modelDir = path.join(out, "model");
    const moe = settings.config.moe;
    const title =
      `${settings.config.architecture} d${settings.config.hiddenSize} ×${settings.config.numLayers}` +
      `${moe ? ` (MoE ${moe.numExperts} experts, top-${moe.topK})` : ""} on ${path.basename(settings.data)}`;
    const save = (step: number) => {
      modelDir = writeCheckpoint(out, trainer, {
        version: 1,
        settings,
        step,
        sampler: sampler.position,
        points,
        tokens,
      });
      writeLossFiles(out, points, title);
    };

    for (let step = trainer.step; step < settings.steps; step++) {
      const lr = learningRate(schedule, step);
      let sum = 0, count = 0;
      for (let micro = 0; micro < settings.gradAccumulation; micro++) {
        const b = sampler.next();
        const r = await trainer.forwardBackward(b.ids, b.targets, settings.batchSize, settings.length, {
          lossScale: 1 / tokensPerStep,
        });
        sum += r.sum;
        count += r.count;
      }
      const { gradNorm } = trainer.optimizerStep({
        lr,
        beta1: settings.beta1,
        beta2: settings.beta2,
        weightDecay: settings.weightDecay,
        maxGradNorm: settings.maxGradNorm,
      });
      tokens += tokensPerStep;
      runTokens += tokensPerStep;
      lastTrain = sum / count;
      const seconds = (Date.now() - started) / 1000;
      const point: LossPoint = { step: step + 1, tokens, trainLoss: lastTrain, lr, tokensPerSecond: runTokens / Math.max(seconds, 1e-9) };
      const last = step + 1 === settings.steps;
      if (last || (settings.evalEvery > 0 && (step + 1) % settings.evalEvery === 0)) {
        lastEval = await evaluate(trainer, dataset.validation, settings);
        if (lastEval !== undefined) {
          point.evalLoss = lastEval;
          bar?.log(`step ${step + 1}: train loss ${lastTrain.toFixed(4)}, eval loss ${lastEval.toFixed(4)} (${(lastEval / Math.LN2).toFixed(3)} bits/byte), grad norm ${gradNorm.toFixed(3)}`);
        }
      }
      points.push(point);
      bar?.update(step + 1, { loss: lastTrain, tokensPerSecond: point.tokensPerSecond, lr });
      if (options.onStep && options.onStep(point) === false && !last) {
        save(step + 1);
        stopped = true;
        break;
      }
      if (last || (settings.saveEvery > 0 && (step + 1) % settings.saveEvery === 0)) save(step + 1);
    }
    bar?.finish();
    const seconds = (Date.now() - started) / 1000;
    return {
      out,
      model: modelDir,
      steps: trainer.step,
      trainLoss: lastTrain,
      evalLoss: lastEval,
      tokensPerSecond: runTokens / Math.max(seconds, 1e-9),
      points,
      stopped,
    };
  } finally {
    if (startWeights) disposeWeights(startWeights);
    created?.dispose();
  }
}

function disposeWeights(weights: Map<string, Tensor>): void {
  for (const t of weights.values()) if (!t.disposed) t.dispose();
}
