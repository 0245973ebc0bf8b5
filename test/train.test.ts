// Training: the native trainer's loss and gradients against PyTorch autograd (fixtures written by
// scripts/fixtures/train_reference.py in float64), the weight conversion A ↔ A_log, and train()
// end to end: the loss falls, the checkpoint loads and generates, and a run resumed after an
// interruption — including a process killed at a random moment, often mid-checkpoint — continues
// exactly the loss curve of an uninterrupted run.
import { spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { initWeights, loadModel, MambaConfig, Trainer, train, trainConfig } from "../lib";
import type { TrainOptions } from "../lib";

interface Fixture {
  config: Omit<MambaConfig, "timeStepLimit"> & { timeStepLimit: [number, number | null] };
  batch: number;
  length: number;
  ids: number[][];
  targets: number[][];
  loss: number;
  /** MoE fixtures: the load-balancing loss's weight, the cross-entropy alone, each MoE block's aux loss. */
  auxWeight?: number;
  ceLoss?: number;
  auxLosses?: number[];
  params: Record<string, { shape: number[]; data: number[] }>;
  grads: Record<string, { shape: number[]; data: number[] }>;
}

function readFixture(name: string): Fixture {
  return JSON.parse(fs.readFileSync(path.join(__dirname, "fixtures", "train", name), "utf8"));
}

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "mamba-train-"));
}

describe("Trainer against PyTorch autograd", () => {
  // moe1 / moe2: Mamba-1 / Mamba-2 layers with MoE blocks between them; their loss is the mean
  // cross-entropy plus auxWeight · Σ load-balancing losses, the trainer's objective with lossScale 1/count.
  for (const name of ["mamba1.json", "mamba2.json", "moe1.json", "moe2.json"]) {
    test(`${name}: loss and every parameter's gradient within 1e-4`, async () => {
      const f = readFixture(name);
      const config = { ...f.config, timeStepLimit: [f.config.timeStepLimit[0], f.config.timeStepLimit[1] ?? Infinity] } as MambaConfig;
      const trainer = new Trainer(config, { scanChunk: 4, auxWeight: f.auxWeight ?? 0 });
      try {
        const params = new Float32Array(trainer.floats);
        for (const s of trainer.slots) {
          const p = f.params[s.name];
          expect(p).toBeDefined();
          expect(p.shape).toEqual(s.shape);
          params.set(p.data, s.offset);
        }
        expect(Object.keys(f.params).length).toBe(trainer.slots.length);
        trainer.write("params", params);
        const ids = Int32Array.from(f.ids.flat());
        const targets = Int32Array.from(f.targets.flat());
        const count = targets.filter((t) => t >= 0).length;
        const r = await trainer.forwardBackward(ids, targets, f.batch, f.length, { lossScale: 1 / count });
        expect(r.count).toBe(count);
        if (f.config.moe) {
          const auxSum = f.auxLosses!.reduce((a, b) => a + b, 0);
          expect(Math.abs(r.sum / count - f.ceLoss!)).toBeLessThan(1e-5 * f.ceLoss!);
          expect(Math.abs(r.aux - auxSum)).toBeLessThan(1e-5 * auxSum);
          expect(Math.abs(r.sum / count + f.auxWeight! * r.aux - f.loss)).toBeLessThan(1e-5 * f.loss);
        } else {
          expect(r.aux).toBe(0);
          expect(Math.abs(r.sum / count - f.loss)).toBeLessThan(1e-5 * f.loss);
        }
        const grads = trainer.tensors("grads");
        for (const s of trainer.slots) {
          const want = f.grads[s.name].data;
          const got = grads.get(s.name)!;
          let err = 0, ref = 0;
          for (let i = 0; i < want.length; i++) {
            err = Math.max(err, Math.abs(got[i] - want[i]));
            ref = Math.max(ref, Math.abs(want[i]));
          }
          // ‖got − want‖∞ ≤ 1e-4 · ‖want‖∞, tensor by tensor
          if (!(err <= 1e-4 * ref)) throw new Error(`${name}: gradient of ${s.name}: error ${err} against max ${ref}`);
        }
      } finally {
        trainer.dispose();
      }
    });
  }

  test("a wrong gradient would be caught: the fixture's gradients are far from zero", () => {
    const f = readFixture("mamba1.json");
    for (const [name, g] of Object.entries(f.grads)) {
      expect({ name, large: Math.max(...g.data.map(Math.abs)) > 1e-5 }).toEqual({ name, large: true });
    }
  });
});

describe("Trainer", () => {
  test("loadWeights and weights() convert A to A_log and back", () => {
    for (const architecture of ["mamba1", "mamba2"] as const) {
      const config = trainConfig({ architecture, hiddenSize: 32, numLayers: 2, headDim: 16 });
      const weights = initWeights(config, { seed: 3 });
      const trainer = new Trainer(config);
      trainer.loadWeights(weights);
      const params = trainer.tensors("params");
      const A = weights.get("layers.1.A")!.data as Float32Array;
      const A_log = params.get("layers.1.A_log")!;
      let logError = 0;
      for (let i = 0; i < A.length; i++) logError = Math.max(logError, Math.abs(A_log[i] - Math.log(-A[i])));
      expect(logError).toBeLessThan(1e-6);
      const back = trainer.weights();
      for (const [name, t] of weights) {
        const got = back.get(name)!.data as Float32Array;
        const want = t.data as Float32Array;
        let worst = 0; // relative, element by element
        for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]) / (Math.abs(want[i]) + 1e-30));
        expect({ name, close: worst <= 2e-7 }).toEqual({ name, close: true });
      }
      for (const t of [...weights.values(), ...back.values()]) t.dispose();
      trainer.dispose();
    }
  });

  test("refuses bad input with a message naming it", async () => {
    const config = trainConfig({ hiddenSize: 16, numLayers: 1 });
    const trainer = new Trainer(config);
    await expect(trainer.forwardBackward(new Int32Array([1, 300]), new Int32Array([1, 2]), 1, 2)).rejects.toThrow(
      /token id 300 at position 1 is outside the vocabulary \[0, 256\)/,
    );
    await expect(trainer.forwardBackward(new Int32Array([1, 2]), new Int32Array([1, 2]), 2, 2)).rejects.toThrow(
      /ids holds 2 values, expected batch · length = 4/,
    );
    expect(() => trainer.optimizerStep({ lr: -1 })).toThrow(/lr must be in/);
    trainer.dispose();
    expect(() => trainer.zeroGrads()).toThrow(/disposed/);
  });
});

// A text with structure a tiny model learns within a few dozen steps.
function writeCorpus(dir: string): string {
  const words = ["the", "state", "space", "model", "reads", "each", "byte", "once", "and", "keeps", "a", "small", "memory"];
  let text = "";
  let s = 7;
  while (text.length < 40000) {
    s = (s * 1103515245 + 12345) % 2147483648;
    text += words[s % words.length] + (s % 5 === 0 ? ".\n" : " ");
  }
  const file = path.join(dir, "corpus.txt");
  fs.writeFileSync(file, text);
  return file;
}

describe("train()", () => {
  jest.setTimeout(180000);

  test("learns a text: the loss falls, the checkpoint loads and generates, the curve is written", async () => {
    const dir = tempDir();
    const data = writeCorpus(dir);
    const result = await train({
      data,
      out: path.join(dir, "run"),
      model: { architecture: "mamba1", hiddenSize: 48, numLayers: 2, stateSize: 8 },
      steps: 150,
      batchSize: 4,
      length: 48,
      lr: 3e-3,
      warmupSteps: 5,
      evalEvery: 50,
      progress: null,
    });
    expect(result.steps).toBe(150);
    expect(result.points).toHaveLength(150);
    const first = result.points[0].trainLoss;
    expect(first).toBeGreaterThan(4.5); // ln 256 = 5.55 for a fresh model
    expect(result.trainLoss).toBeLessThan(first - 2);
    expect(result.evalLoss).toBeDefined();
    expect(result.evalLoss!).toBeLessThan(1.5);
    const csv = fs.readFileSync(path.join(dir, "run", "loss.csv"), "utf8").trim().split("\n");
    expect(csv).toHaveLength(151);
    expect(fs.readFileSync(path.join(dir, "run", "loss.svg"), "utf8")).toMatch(/^<svg/);
    expect(fs.readdirSync(path.join(dir, "run")).filter((n) => n.includes(".tmp-") || n.endsWith(".old"))).toEqual([]);

    const model = await loadModel(result.model);
    const completion = await model.complete("the state ", { maxTokens: 40, temperature: 0 });
    model.dispose();
    // Greedy text from a model that learnt the corpus is made of its words.
    const words = completion.text.split(/[\s.]+/).filter((w) => w.length > 0);
    expect(words.length).toBeGreaterThan(2);
    const known = words.slice(0, -1).filter((w) => /^(the|state|space|model|reads|each|byte|once|and|keeps|a|small|memory)$/.test(w));
    expect(known.length).toBeGreaterThanOrEqual(Math.max(1, words.length - 2));
    // The command line generates from the trained checkpoint the same greedy text.
    const cli = spawnSync(process.execPath, [path.join(__dirname, "..", "dist", "cli.js"), "generate", "the state ", "--model", result.model,
      "--temperature", "0", "--max-tokens", "40"], { encoding: "utf8", timeout: 60000 });
    expect(cli.status).toBe(0);
    expect(cli.stdout).toBe(completion.text + "\n");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("Mamba-2 trains too", async () => {
    const dir = tempDir();
    const result = await train({
      data: writeCorpus(dir),
      out: path.join(dir, "run"),
      model: { architecture: "mamba2", hiddenSize: 32, numLayers: 2, stateSize: 16, headDim: 16 },
      steps: 40,
      batchSize: 4,
      length: 40,
      lr: 3e-3,
      progress: null,
    });
    expect(result.trainLoss).toBeLessThan(result.points[0].trainLoss - 1.5);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a mixture-of-experts model (BlackMamba) trains, and its checkpoint reloads, generates and converts", async () => {
    const dir = tempDir();
    const result = await train({
      data: writeCorpus(dir),
      out: path.join(dir, "run"),
      model: { architecture: "mamba1", hiddenSize: 32, numLayers: 4, stateSize: 8, moeExperts: 4, moeTopK: 2, moeHiddenSize: 48 },
      auxWeight: 0.02,
      steps: 40,
      batchSize: 4,
      length: 40,
      lr: 3e-3,
      progress: null,
    });
    expect(result.trainLoss).toBeLessThan(result.points[0].trainLoss - 1.5);
    const model = await loadModel(result.model);
    try {
      expect(model.config.moe).toEqual({
        layers: [1, 3], numExperts: 4, topK: 2, hiddenSize: 48, scoring: "softmax", renormalize: true, activation: "silu", bias: false,
      });
      expect(model.weights.get("layers.1.fc1")!.shape).toEqual([4, 96, 32]);
      expect(model.weights.has("layers.1.in_proj")).toBe(false);
      // Only the two Mamba layers carry state.
      const state = model.createState(1);
      expect(state.conv.shape).toEqual([2, 1, 3, 64]);
      state.dispose();
      const greedy = await model.complete("the state ", { maxTokens: 30, temperature: 0 });
      // Prefill of the whole text equals prefill + steps (MoE blocks in both paths).
      const ids = [...Buffer.from("the state " + greedy.text)];
      const whole = await model.forward(ids);
      const s = model.createState(1);
      const split = 11;
      await model.prefill(s, ids.slice(0, split));
      let worst = 0;
      const all = whole.data as Float32Array;
      for (let t = split; t < ids.length; t++) {
        const step = await model.step(s, [ids[t]]);
        const got = step.data as Float32Array;
        for (let v = 0; v < 256; v++) worst = Math.max(worst, Math.abs(got[v] - all[t * 256 + v]) / (Math.abs(all[t * 256 + v]) + 1));
        step.dispose();
      }
      s.dispose();
      whole.dispose();
      expect(worst).toBeLessThan(1e-4);
      // GGUF has no MoE Mamba architecture: refused with a message, nothing written.
      await expect(model.save(path.join(dir, "m.gguf"), { format: "gguf" })).rejects.toThrow(/GGUF has no mixture-of-experts/);
      expect(fs.existsSync(path.join(dir, "m.gguf"))).toBe(false);
      // bf16 safetensors: the experts stored in bf16, the same configuration back.
      await model.save(path.join(dir, "bf16"), { format: "safetensors", dtype: "bf16" });
      const back = await loadModel(path.join(dir, "bf16"));
      expect(back.config.moe).toEqual(model.config.moe);
      expect(back.weights.get("layers.3.fc2")!.dtype).toBe("bf16");
      const again = await back.complete("the state ", { maxTokens: 8, temperature: 0 });
      expect(again.text.length).toBeGreaterThan(0);
      back.dispose();
    } finally {
      model.dispose();
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("MoE training options are checked", () => {
    expect(() => trainConfig({ numLayers: 1, moeExperts: 4 })).toThrow(/needs numLayers >= 2/);
    expect(() => trainConfig({ moeExperts: 2, moeTopK: 3 })).toThrow(/moeTopK 3 exceeds moeExperts 2/);
    expect(() => trainConfig({ moeTopK: 2 })).toThrow(/need moeExperts/);
    expect(trainConfig({ numLayers: 5, moeExperts: 3 }).moe!.layers).toEqual([1, 3]);
  });

  const options = (data: string, out: string): TrainOptions => ({
    data,
    out,
    model: { architecture: "mamba1", hiddenSize: 32, numLayers: 2, stateSize: 8 },
    steps: 16,
    batchSize: 2,
    length: 32,
    gradAccumulation: 2,
    lr: 2e-3,
    warmupSteps: 3,
    evalEvery: 5,
    saveEvery: 1,
    seed: 4,
    progress: null,
  });

  test("a run stopped and resumed continues the same loss curve", async () => {
    const dir = tempDir();
    const data = writeCorpus(dir);
    const whole = await train(options(data, path.join(dir, "whole")));
    const stopped = await train({ ...options(data, path.join(dir, "part")), onStep: (p) => p.step < 7 });
    expect(stopped.stopped).toBe(true);
    expect(stopped.steps).toBe(7);
    const resumed = await train({ data, out: path.join(dir, "part"), resume: true, progress: null });
    expect(resumed.steps).toBe(16);
    expect(resumed.points.map((p) => p.trainLoss)).toEqual(whole.points.map((p) => p.trainLoss));
    expect(resumed.points.map((p) => p.evalLoss)).toEqual(whole.points.map((p) => p.evalLoss));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("a process killed at a random moment resumes from its last whole checkpoint and continues the same curve", async () => {
    const dir = tempDir();
    const data = writeCorpus(dir);
    const o = options(data, path.join(dir, "whole"));
    const whole = await train({ ...o, steps: 30 });
    const out = path.join(dir, "killed");
    const cli = path.join(__dirname, "..", "dist", "cli.js");
    const args = [cli, "train", "--data", data, "--out", out, "--arch", "mamba1", "--d-model", "32", "--layers", "2", "--state", "8",
      "--steps", "30", "--batch", "2", "--length", "32", "--grad-accum", "2", "--lr", "0.002", "--warmup", "3", "--eval-every", "5",
      "--save-every", "1", "--seed", "4"];
    const child = spawn(process.execPath, args, { stdio: "ignore" });
    // Kill it a random few milliseconds after its first checkpoint appears: checkpoints are written
    // every step, so the kill often lands inside one.
    await new Promise<void>((resolve, reject) => {
      const started = Date.now();
      const poll = setInterval(() => {
        if (fs.existsSync(path.join(out, "model", "trainer.json")) || fs.existsSync(path.join(out, "model.old"))) {
          clearInterval(poll);
          setTimeout(() => {
            child.kill("SIGKILL");
            resolve();
          }, 20 + Math.floor(Math.random() * 200));
        } else if (Date.now() - started > 60000) {
          clearInterval(poll);
          child.kill("SIGKILL");
          reject(new Error("the training process wrote no checkpoint within 60 s"));
        }
      }, 2);
    });
    await new Promise((r) => child.once("exit", r));
    const resumed = await train({ data, out, resume: true, progress: null });
    expect(resumed.steps).toBe(30);
    expect(resumed.points.map((p) => p.trainLoss)).toEqual(whole.points.map((p) => p.trainLoss));
    expect(fs.readdirSync(out).filter((n) => n.includes(".tmp-") || n.endsWith(".old"))).toEqual([]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("init fine-tunes from a checkpoint: training continues from its weights, with its configuration", async () => {
    const dir = tempDir();
    const data = writeCorpus(dir);
    const base = await train({ ...options(data, path.join(dir, "base")), steps: 40 });
    const tuned = await train({ data, out: path.join(dir, "tuned"), init: base.model, steps: 5, batchSize: 2, length: 32,
      lr: 1e-3, warmupSteps: 0, progress: null });
    // A fresh model starts near ln 256 = 5.55; one that starts from the trained weights starts near their loss.
    expect(base.points[0].trainLoss).toBeGreaterThan(5);
    expect(tuned.points[0].trainLoss).toBeLessThan(base.trainLoss + 0.5);
    const model = await loadModel(tuned.model);
    expect(model.config.hiddenSize).toBe(32);
    expect(model.config.numLayers).toBe(2);
    model.dispose();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test("the train command names a missing or wrong option", () => {
    const cli = path.join(__dirname, "..", "dist", "cli.js");
    const noData = spawnSync(process.execPath, [cli, "train", "--out", "x"], { encoding: "utf8" });
    expect(noData.status).toBe(2);
    expect(noData.stderr).toMatch(/train needs --data FILE/);
    const badLr = spawnSync(process.execPath, [cli, "train", "--data", "a.txt", "--out", "x", "--lr", "fast"], { encoding: "utf8" });
    expect(badLr.status).toBe(2);
    expect(badLr.stderr).toMatch(/--lr must be a number >= 0, got "fast"/);
    const unknown = spawnSync(process.execPath, [cli, "train", "--data", "a.txt", "--out", "x", "--epochs", "3"], { encoding: "utf8" });
    expect(unknown.stderr).toMatch(/unknown option --epochs/);
  });

  test("bad options are refused before any work", async () => {
    const dir = tempDir();
    await expect(train({ data: path.join(dir, "missing.txt"), out: path.join(dir, "o"), progress: null })).rejects.toThrow(/missing\.txt/);
    const data = writeCorpus(dir);
    await expect(train({ data, out: path.join(dir, "o"), steps: 0, progress: null })).rejects.toThrow(/steps must be an integer >= 1/);
    await expect(train({ data, out: path.join(dir, "o"), model: { architecture: "mamba3" as "mamba1" }, progress: null })).rejects.toThrow(
      /architecture must be "mamba1" or "mamba2"/,
    );
    await expect(train({ data, out: path.join(dir, "none"), resume: true, progress: null })).rejects.toThrow(/nothing to resume/);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});
