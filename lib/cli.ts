#!/usr/bin/env node
// The mamba-ssm command line: generate, train, inspect, convert, info.
import * as fs from "fs";
import * as path from "path";
import { packageRoot } from "./native";
import { cpuInfo, getThreads, setThreads } from "./runtime";
import { cudaInfo } from "./models/cuda-model";
import type { Device } from "./models/model";
import { version } from "./version";

const USAGE = `mamba-ssm ${version}

Usage:
  mamba-ssm generate [prompt] [--model PATH] [options] stream a continuation (prompt from stdin when absent;
                                                       without --model, the embedded default model)
      --max-tokens N (128)  --temperature T (0.8)  --top-k K (40)  --top-p P (0.95)  --min-p P (0)
      --repetition-penalty R (1)  --seed S  --stop STRING (repeatable)  --dtype f32|bf16|q8_0  --json
      --device cpu|cuda|cuda:N (cpu; cuda needs an addon built by npm run build:cuda)
  mamba-ssm train --data FILE --out DIR [options]     train a byte-level model on a text file
      --arch mamba1|mamba2 (mamba1)  --d-model N (128)  --layers N (4)  --state N (16; mamba2 64)
      --expand N (2)  --head-dim N (mamba2, 32)  --config FILE (JSON of those fields)  --init PATH
      --moe-experts N (every second layer an MoE block of N experts)  --moe-top-k K (1)
      --moe-hidden N (2 · d-model)  --aux-weight X (0.01: the MoE load-balancing loss)
      --steps N (1000)  --batch N (8)  --length N (256)  --grad-accum N (1)  --lr X (1e-3)
      --min-lr X (lr/10)  --warmup N  --weight-decay X (0.1)  --max-grad-norm X (1)  --seed S (0)
      --eval-every N  --eval-batches N (8)  --save-every N  --val-fraction X (0.05)  --resume
      writes DIR/model (a checkpoint generate --model reads), DIR/loss.csv and DIR/loss.svg
  mamba-ssm inspect PATH [--json]                      architecture, sizes, dtypes, parameters, memory
  mamba-ssm convert IN OUT --to gguf|safetensors [--dtype f32|f16|bf16|q8_0]
  mamba-ssm info                                       version, CPU kernel level, threads, CUDA
  mamba-ssm --version | --help

Every command takes --threads N. PATH is a Hugging Face or mamba_ssm folder, or a GGUF file.

Environment:
  MAMBA_SSM_CPU=baseline|avx2|avx512|avx512bf16   use a lower CPU kernel level
  MAMBA_SSM_THREADS=N                             size of the thread pool
`;

class UsageError extends Error {}

/** The small byte-level model shipped in the package (models/default). */
const DEFAULT_MODEL = path.join(packageRoot, "models", "default");

interface Parsed {
  positional: string[];
  flags: Map<string, string[]>;
}

const BOOLEAN_FLAGS = new Set(["json", "help", "version", "resume"]);

function parse(argv: string[]): Parsed {
  const positional: string[] = [];
  const flags = new Map<string, string[]>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "-h") flags.set("help", ["true"]);
    else if (a === "-v") flags.set("version", ["true"]);
    else if (a.startsWith("--")) {
      const eq = a.indexOf("=");
      const name = eq > 0 ? a.slice(2, eq) : a.slice(2);
      let value: string;
      if (eq > 0) value = a.slice(eq + 1);
      else if (BOOLEAN_FLAGS.has(name)) value = "true";
      else {
        if (i + 1 >= argv.length) throw new UsageError(`--${name} needs a value`);
        value = argv[++i];
      }
      flags.set(name, [...(flags.get(name) ?? []), value]);
    } else positional.push(a);
  }
  return { positional, flags };
}

function flag(p: Parsed, name: string): string | undefined {
  const v = p.flags.get(name);
  return v ? v[v.length - 1] : undefined;
}

function numberFlag(p: Parsed, name: string, check: (v: number) => boolean, expect: string): number | undefined {
  const raw = flag(p, name);
  if (raw === undefined) return undefined;
  const v = Number(raw);
  if (raw.trim() === "" || !Number.isFinite(v) || !check(v)) throw new UsageError(`--${name} must be ${expect}, got "${raw}"`);
  return v;
}

function checkFlags(p: Parsed, allowed: string[]) {
  for (const name of p.flags.keys()) {
    if (!allowed.includes(name) && name !== "threads") throw new UsageError(`unknown option --${name}`);
  }
}

function dtypeFlag(p: Parsed, allowed: string[]): string | undefined {
  const d = flag(p, "dtype");
  if (d !== undefined && !allowed.includes(d)) throw new UsageError(`--dtype must be one of ${allowed.join(", ")}, got "${d}"`);
  return d;
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) throw new UsageError("generate needs a prompt (an argument, or text on standard input)");
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

async function generate(p: Parsed): Promise<number> {
  checkFlags(p, ["model", "max-tokens", "temperature", "top-k", "top-p", "min-p", "repetition-penalty", "seed", "stop", "dtype", "json", "device"]);
  const modelPath = flag(p, "model") ?? DEFAULT_MODEL;
  if (!fs.existsSync(modelPath)) {
    throw new UsageError(
      modelPath === DEFAULT_MODEL
        ? `the embedded default model is missing (${DEFAULT_MODEL}); pass --model PATH`
        : `--model ${modelPath}: no such file or folder`,
    );
  }
  if (p.positional.length > 1) throw new UsageError(`generate takes one prompt; quote it ("${p.positional.join(" ")}")`);
  const prompt = p.positional.length ? p.positional[0] : await readStdin();
  const options = {
    maxTokens: numberFlag(p, "max-tokens", (v) => Number.isInteger(v) && v >= 0, "an integer >= 0"),
    temperature: numberFlag(p, "temperature", (v) => v >= 0, "a number >= 0"),
    topK: numberFlag(p, "top-k", (v) => Number.isInteger(v) && v >= 0, "an integer >= 0"),
    topP: numberFlag(p, "top-p", (v) => v > 0 && v <= 1, "in (0, 1]"),
    minP: numberFlag(p, "min-p", (v) => v >= 0 && v <= 1, "in [0, 1]"),
    repetitionPenalty: numberFlag(p, "repetition-penalty", (v) => v > 0, "a number > 0"),
    seed: numberFlag(p, "seed", (v) => Number.isSafeInteger(v) && v >= 0, "a non-negative integer"),
    stop: p.flags.get("stop"),
  };
  const dtype = dtypeFlag(p, ["f32", "bf16", "q8_0"]) as "f32" | "bf16" | "q8_0" | undefined;
  const device = flag(p, "device") ?? "cpu";
  if (!/^(cpu|cuda|cuda:\d+)$/.test(device)) throw new UsageError(`--device must be cpu, cuda or cuda:N, got "${device}"`);
  const { loadModel } = await import("./models/model");
  const model = await loadModel(modelPath, { dtype, device: device as Device });
  const controller = new AbortController();
  const onSignal = () => controller.abort();
  process.once("SIGINT", onSignal);
  try {
    const json = p.flags.has("json");
    const it = model.generate(prompt, { ...options, signal: controller.signal });
    let text = "";
    const tokens: number[] = [];
    for (;;) {
      const r = await it.next();
      if (r.done) {
        if (json) {
          process.stdout.write(JSON.stringify({ prompt, text, tokens, stats: r.value }) + "\n");
        } else {
          process.stdout.write("\n");
          const s = r.value;
          process.stderr.write(
            `[${s.promptTokens} prompt tokens at ${s.prefillTokensPerSecond.toFixed(1)} tok/s, ` +
              `${s.generatedTokens} generated at ${s.decodeTokensPerSecond.toFixed(1)} tok/s; ${s.finishReason}]\n`,
          );
        }
        break;
      }
      text += r.value.text;
      if (r.value.token !== null) tokens.push(r.value.token);
      if (!json && r.value.text) process.stdout.write(r.value.text);
    }
  } finally {
    process.removeListener("SIGINT", onSignal);
    model.dispose();
  }
  return 0;
}

function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function inspect(p: Parsed): Promise<number> {
  checkFlags(p, ["json"]);
  if (p.positional.length !== 1) throw new UsageError("inspect takes one PATH");
  const { loadModel } = await import("./models/model");
  const model = await loadModel(p.positional[0]);
  try {
    const dtypes: Record<string, number> = {};
    for (const t of model.weights.values()) dtypes[t.dtype] = (dtypes[t.dtype] ?? 0) + 1;
    const c = model.config;
    const info = {
      path: model.source,
      format: model.format,
      architecture: c.architecture,
      config: c,
      parameters: model.parameterCount,
      weightBytes: model.weightBytes,
      tensors: model.weights.size,
      dtypes,
      tokenizer: model.hasTokenizer ? model.tokenizer.constructor.name : null,
      stateBytesPerSequence: (() => {
        const s = model.createState(1);
        const n = s.byteLength;
        s.dispose();
        return n;
      })(),
    };
    if (p.flags.has("json")) {
      process.stdout.write(JSON.stringify(info, null, 2) + "\n");
      return 0;
    }
    const lines = [
      `${info.path} (${info.format})`,
      `architecture   ${c.architecture === "mamba1" ? "Mamba-1 (selective scan)" : "Mamba-2 (SSD)"}`,
      `layers         ${c.numLayers}`,
      `d_model        ${c.hiddenSize}`,
      `d_inner        ${c.intermediateSize}`,
      `state size     ${c.stateSize}`,
      c.architecture === "mamba1"
        ? `dt rank        ${c.timeStepRank}`
        : `heads          ${c.numHeads} × ${c.headDim}, ${c.numGroups} group(s), chunk ${c.chunkSize}`,
      `conv kernel    ${c.convKernel}`,
      ...(c.moe
        ? [
            `MoE blocks     layers ${c.moe.layers.join(", ")}: ${c.moe.numExperts} experts of width ${c.moe.hiddenSize}, ` +
              `top-${c.moe.topK} ${c.moe.scoring}${c.moe.renormalize ? " (renormalised)" : ""}, ${c.moe.activation} GLU`,
          ]
        : []),
      `vocabulary     ${c.vocabSize}${c.tieEmbeddings ? " (tied head)" : ""}`,
      `parameters     ${info.parameters.toLocaleString("en-US")}`,
      `weights        ${formatBytes(info.weightBytes)} in ${info.tensors} tensors (${Object.entries(dtypes).map(([k, v]) => `${v} ${k}`).join(", ")})`,
      `state          ${formatBytes(info.stateBytesPerSequence)} per sequence`,
      `tokenizer      ${info.tokenizer ?? "none"}`,
    ];
    process.stdout.write(lines.join("\n") + "\n");
  } finally {
    model.dispose();
  }
  return 0;
}

async function convert(p: Parsed): Promise<number> {
  checkFlags(p, ["to", "dtype"]);
  if (p.positional.length !== 2) throw new UsageError("convert takes IN and OUT");
  const to = flag(p, "to");
  if (to !== "gguf" && to !== "safetensors") throw new UsageError(`convert needs --to gguf or --to safetensors, got ${to ?? "nothing"}`);
  const dtype = dtypeFlag(p, ["f32", "f16", "bf16", "q8_0"]) as "f32" | "f16" | "bf16" | "q8_0" | undefined;
  const [input, output] = p.positional;
  if (fs.existsSync(output) && fs.realpathSync(output) === fs.realpathSync(input)) throw new UsageError("OUT must differ from IN");
  const { loadModel } = await import("./models/model");
  const bar = progressBar(`converting to ${to}${dtype ? ` (${dtype})` : ""}`);
  bar(0, 3, "loading");
  const model = await loadModel(input);
  try {
    bar(1, 3, "writing");
    await model.save(output, { format: to, dtype });
    bar(3, 3, "done");
  } finally {
    model.dispose();
  }
  process.stderr.write(`\nwrote ${output}\n`);
  return 0;
}

function progressBar(label: string) {
  return (done: number, total: number, what: string) => {
    const width = 30;
    const filled = Math.round((width * done) / total);
    const line = `${label} [${"#".repeat(filled)}${"-".repeat(width - filled)}] ${Math.round((100 * done) / total)}% ${what}`;
    if (process.stderr.isTTY) process.stderr.write(`\r${line}\x1b[K`);
    else process.stderr.write(line + "\n");
  };
}

async function trainCommand(p: Parsed): Promise<number> {
  const sizeFlags: Record<string, string> = {
    arch: "architecture", "d-model": "hiddenSize", layers: "numLayers", state: "stateSize", expand: "expand",
    "head-dim": "headDim", groups: "numGroups", "conv-kernel": "convKernel", "dt-rank": "timeStepRank",
    "moe-experts": "moeExperts", "moe-top-k": "moeTopK", "moe-hidden": "moeHiddenSize",
  };
  const runFlags: Record<string, string> = {
    steps: "steps", batch: "batchSize", length: "length", "grad-accum": "gradAccumulation", warmup: "warmupSteps",
    "eval-every": "evalEvery", "eval-batches": "evalBatches", "save-every": "saveEvery", seed: "seed",
  };
  const realFlags: Record<string, string> = {
    lr: "lr", "min-lr": "minLr", "weight-decay": "weightDecay", "max-grad-norm": "maxGradNorm",
    "val-fraction": "validationFraction", beta1: "beta1", beta2: "beta2", "aux-weight": "auxWeight",
  };
  checkFlags(p, ["data", "out", "config", "init", "resume", ...Object.keys(sizeFlags), ...Object.keys(runFlags), ...Object.keys(realFlags)]);
  if (p.positional.length) throw new UsageError(`train takes no positional arguments, got "${p.positional[0]}"`);
  const data = flag(p, "data");
  const out = flag(p, "out");
  if (!data) throw new UsageError("train needs --data FILE (a text file to learn from)");
  if (!out) throw new UsageError("train needs --out DIR (where the checkpoint and the loss curve go)");
  const model: Record<string, unknown> = {};
  const configFile = flag(p, "config");
  if (configFile) {
    let json: unknown;
    try {
      json = JSON.parse(fs.readFileSync(configFile, "utf8"));
    } catch (e) {
      throw new UsageError(`--config ${configFile}: ${(e as Error).message}`);
    }
    if (typeof json !== "object" || json === null || Array.isArray(json)) throw new UsageError(`--config ${configFile}: expected a JSON object`);
    Object.assign(model, json);
  }
  for (const [name, field] of Object.entries(sizeFlags)) {
    const raw = flag(p, name);
    if (raw === undefined) continue;
    model[field] = name === "arch" ? raw : numberFlag(p, name, (v) => Number.isInteger(v) && v >= 1, "an integer >= 1");
  }
  const options: Record<string, unknown> = { data, out, model, init: flag(p, "init"), resume: p.flags.has("resume") };
  for (const [name, field] of Object.entries(runFlags)) {
    const v = numberFlag(p, name, (x) => Number.isInteger(x) && x >= 0, "an integer >= 0");
    if (v !== undefined) options[field] = v;
  }
  for (const [name, field] of Object.entries(realFlags)) {
    const v = numberFlag(p, name, (x) => x >= 0, "a number >= 0");
    if (v !== undefined) options[field] = v;
  }
  const { train } = await import("./training/train");
  const result = await train(options as unknown as import("./training/train").TrainOptions);
  const evalText = result.evalLoss !== undefined ? `, eval loss ${result.evalLoss.toFixed(4)} (${(result.evalLoss / Math.LN2).toFixed(3)} bits/byte)` : "";
  process.stdout.write(
    `trained ${result.steps} steps: train loss ${result.trainLoss.toFixed(4)}${evalText}, ${Math.round(result.tokensPerSecond)} tokens/s\n` +
      `model: ${result.model}\nloss curve: ${path.join(result.out, "loss.svg")}, ${path.join(result.out, "loss.csv")}\n`,
  );
  return 0;
}

function info(): number {
  const cpu = cpuInfo();
  const cuda = cudaInfo();
  const gpus = cuda.devices.map((d) => `${d.index}: ${d.name} (sm_${d.computeCapability.replace(".", "")}, ${formatBytes(d.memoryBytes)})`);
  process.stdout.write(
    `mamba-ssm ${version}\n` +
      `cpu level: ${cpu.level} (best ${cpu.best}; supported: ${cpu.supported.join(", ")})\n` +
      `threads:   ${getThreads()}\n` +
      `cuda:      ${gpus.length ? gpus.join("; ") + (cuda.cublas ? " (cuBLAS)" : "") : `none (${cuda.error})`}\n`,
  );
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const p = parse(argv);
  if (p.flags.has("help")) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (p.flags.has("version") && p.positional.length === 0) {
    process.stdout.write(`${version}\n`);
    return 0;
  }
  const threads = numberFlag(p, "threads", (v) => Number.isInteger(v) && v >= 1, "an integer >= 1");
  if (threads !== undefined) setThreads(threads);
  const command = p.positional.length ? p.positional.shift()! : "info";
  switch (command) {
    case "generate":
      return generate(p);
    case "train":
      return trainCommand(p);
    case "inspect":
      return inspect(p);
    case "convert":
      return convert(p);
    case "info":
      checkFlags(p, []);
      return info();
    default:
      throw new UsageError(`unknown command "${command}"`);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof UsageError) {
      process.stderr.write(`mamba-ssm: ${err.message}\n\n${USAGE}`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`mamba-ssm: ${(err as Error).message}\n`);
      process.exitCode = 1;
    }
  },
);
