// The examples the README points to run and print what they promise.
import { execFileSync } from "child_process";
import * as path from "path";

const root = path.join(__dirname, "..");
const tsNode = (script: string, ...args: string[]) =>
  execFileSync(process.execPath, ["-r", "ts-node/register", path.join(root, "examples", script), ...args], {
    cwd: root,
    encoding: "utf8",
    env: { ...process.env, TS_NODE_PROJECT: path.join(root, "tsconfig.test.json"), TS_NODE_TRANSPILE_ONLY: "1" },
    timeout: 120000,
  });

test("examples/mamba-block.ts builds and runs a Mamba-1 block from ops", () => {
  expect(tsNode("mamba-block.ts")).toMatch(/Mamba-1 block: in \[2, 16, 64\] → out \[2, 16, 64\], output RMS \d+\.\d+/);
});

test("examples/generate.ts streams text and forks a state", () => {
  const out = tsNode("generate.ts", path.join(root, "test", "fixtures", "models", "mamba1-bytebpe", "hf"), "the café");
  expect(out).toMatch(/^mamba1, 1 layers, d_model 16, vocabulary 280/);
  expect(out).toMatch(/\[\d+ tokens at [\d.]+ tok\/s, (length|eos)\]/);
  expect(out).toMatch(/a cloned state continues identically: true/);
});
