// The command line on the fixture checkpoints: generate (argument, stdin, --json), inspect, convert.
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import { loadModel } from "../lib";
import { parsePythonJson } from "../lib/io/json";

const cli = path.join(__dirname, "..", "dist", "cli.js");
const fixture = path.join(__dirname, "fixtures", "models", "mamba1-bytebpe");
const expected = parsePythonJson(fs.readFileSync(path.join(fixture, "expected.json"), "utf8")) as {
  texts: string[];
  greedy: number[][];
};

function run(args: string[], input?: string) {
  return spawnSync(process.execPath, [cli, ...args], { encoding: "utf8", input, timeout: 60000 });
}

describe("mamba-ssm generate", () => {
  let greedyText = "";
  beforeAll(async () => {
    const model = await loadModel(path.join(fixture, "hf"));
    greedyText = model.tokenizer.decode(expected.greedy[1]);
    model.dispose();
  });

  test("streams the greedy continuation of a prompt given as an argument", () => {
    const r = run(["generate", expected.texts[1], "--model", path.join(fixture, "hf"), "--temperature", "0", "--max-tokens", "8"]);
    expect(r.stderr).toMatch(/\[\d+ prompt tokens at [\d.]+ tok\/s, 8 generated at [\d.]+ tok\/s; length\]/);
    expect(r.status).toBe(0);
    expect(r.stdout).toBe(greedyText + "\n");
  });

  test("reads the prompt from standard input, and --json prints text, tokens and stats", () => {
    const r = run(["generate", "--model", path.join(fixture, "model.gguf"), "--temperature", "0", "--max-tokens", "8", "--json"], expected.texts[1]);
    expect(r.status).toBe(0);
    const out = JSON.parse(r.stdout);
    expect(out.tokens).toEqual(expected.greedy[1]);
    expect(out.text).toBe(greedyText);
    expect(out.stats.generatedTokens).toBe(8);
    expect(out.stats.promptTokens).toBe(7);
  });

  test("the same seed gives the same text", () => {
    const args = ["generate", "the", "--model", path.join(fixture, "hf"), "--seed", "3", "--max-tokens", "12", "--json"];
    expect(JSON.parse(run(args).stdout).tokens).toEqual(JSON.parse(run(args).stdout).tokens);
  });

  test("bad options exit 2 and say what was wrong", () => {
    const bad = run(["generate", "x", "--model", path.join(fixture, "hf"), "--top-p", "1.5"]);
    expect(bad.status).toBe(2);
    expect(bad.stderr).toContain('--top-p must be in (0, 1], got "1.5"');
    const missing = run(["generate", "x", "--model", "/nonexistent/model"]);
    expect(missing.status).toBe(2);
    expect(missing.stderr).toContain("--model /nonexistent/model: no such file or folder");
    const unknown = run(["generate", "x", "--model", path.join(fixture, "hf"), "--frobnicate", "1"]);
    expect(unknown.stderr).toContain("unknown option --frobnicate");
  });

  test("a broken checkpoint exits 1 with the loader's message", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-cli-"));
    try {
      fs.writeFileSync(path.join(dir, "config.json"), JSON.stringify({ model_type: "mamba", hidden_size: 8 }));
      const r = run(["generate", "x", "--model", dir]);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/config\.json/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("the embedded default model", () => {
  test("generate without --model uses models/default and is reproducible with a seed", () => {
    const args = ["generate", "The Python ", "--max-tokens", "24", "--seed", "5", "--json"];
    const a = run(args);
    expect(a.status).toBe(0);
    const out = JSON.parse(a.stdout);
    expect(out.tokens).toHaveLength(24);
    expect(out.tokens.every((t: number) => t >= 0 && t < 256)).toBe(true);
    expect(JSON.parse(run(args).stdout).text).toBe(out.text);
    const info = JSON.parse(run(["inspect", path.join(__dirname, "..", "models", "default"), "--json"]).stdout);
    expect(info.architecture).toBe("mamba2");
    expect(info.config.vocabSize).toBe(256);
  });
});

describe("mamba-ssm inspect and convert", () => {
  test("inspect prints the architecture, sizes, dtypes, parameters and memory", () => {
    const r = run(["inspect", path.join(fixture, "model-q8_0.gguf")]);
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/architecture\s+Mamba-1/);
    expect(r.stdout).toMatch(/vocabulary\s+280/);
    expect(r.stdout).toMatch(/q8_0/);
    expect(r.stdout).toMatch(/parameters\s+[\d,]+/);
    const json = JSON.parse(run(["inspect", path.join(fixture, "hf"), "--json"]).stdout);
    expect(json.architecture).toBe("mamba1");
    expect(json.parameters).toBeGreaterThan(0);
    expect(json.dtypes).toEqual({ f32: json.tensors });
  });

  test("convert writes a GGUF in the asked dtype that generates the same greedy text", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "mamba-ssm-cli-"));
    try {
      const out = path.join(dir, "out.gguf");
      const r = run(["convert", path.join(fixture, "hf"), out, "--to", "gguf", "--dtype", "f16"]);
      expect(r.status).toBe(0);
      expect(r.stderr).toContain("100%");
      const info = JSON.parse(run(["inspect", out, "--json"]).stdout);
      expect(info.dtypes.f16).toBeGreaterThan(0);
      const g = JSON.parse(run(["generate", expected.texts[1], "--model", out, "--temperature", "0", "--max-tokens", "8", "--json"]).stdout);
      expect(g.tokens).toEqual(expected.greedy[1]);
      const back = path.join(dir, "hf");
      expect(run(["convert", out, back, "--to", "safetensors"]).status).toBe(0);
      expect(fs.existsSync(path.join(back, "config.json"))).toBe(true);
      expect(run(["convert", out, back]).stderr).toContain("convert needs --to gguf or --to safetensors");
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
