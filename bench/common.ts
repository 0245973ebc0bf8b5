// Pieces shared by the generation benchmarks: the random models in mamba-130m / mamba2-130m shapes
// (written as GGUF by mamba-ssm's own writer), the machine's read bandwidth, prompts, and tables.
import { Tensor } from "../lib";
import { saveCheckpoint } from "../lib/io/checkpoint";
import { isMatrixWeight } from "../lib/models/config";
import { initWeights, preset } from "../lib/models/init";
import { native } from "../lib/native";
import { bytesToByteLevel } from "../lib/tokenizers/byte-level";

export type Arch = "mamba-130m" | "mamba2-130m";
export type WeightType = "f32" | "bf16" | "q8_0";
export const ARCHS: readonly Arch[] = ["mamba-130m", "mamba2-130m"];
export const WEIGHT_TYPES: readonly WeightType[] = ["f32", "bf16", "q8_0"];

/** Read bandwidth in bytes/s: the best of five vectorised sums over 1 GiB, on every pool thread. */
export function measureBandwidth(): number {
  const bytes = 1 << 30;
  const t = Tensor.zeros([bytes / 4]);
  (t.data as Float32Array).fill(1);
  let best = Infinity;
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    native().readSum({ data: t.buffer(), n: bytes / 4 });
    best = Math.min(best, performance.now() - t0);
  }
  t.dispose();
  return bytes / (best / 1000);
}

/**
 * Writes the random model of `arch` (seeded, so every call writes the same weights) with its matrices
 * in `dtype` as a GGUF file. The file carries a small byte-level "gpt2" vocabulary (the 256 byte tokens
 * and a few merges, padded to the embedding's rows) so that llama.cpp loads it too.
 */
export function makeBenchModel(arch: Arch, dtype: WeightType, file: string): void {
  const config = preset(arch);
  const weights = initWeights(config, { seed: 1 });
  if (dtype !== "f32") {
    for (const [name, t] of weights) {
      if (isMatrixWeight(name)) {
        // As llama.cpp does, a matrix whose rows are not whole q8_0 blocks (dt_proj at rank 48) is kept in f16.
        const rowsFit = t.shape[t.shape.length - 1] % 32 === 0;
        weights.set(name, t.to(dtype === "q8_0" && !rowsFit ? "f16" : dtype));
        t.dispose();
      }
    }
  }
  const tokens = Array.from({ length: 256 }, (_, b) => bytesToByteLevel([b]));
  const merges = ["Ġ t", "Ġ a", "h e", "i n", "r e"];
  for (const m of merges) tokens.push(m.replace(" ", ""));
  saveCheckpoint(file, { config, weights, tokenizer: { kind: "gguf", tokens, merges, model: "gpt2" } }, { format: "gguf" });
  for (const t of weights.values()) t.dispose();
}

/** A deterministic prompt of `length` token ids below `vocab` (`salt` makes different prompts). */
export function promptIds(length: number, vocab: number, salt = 0): number[] {
  return Array.from({ length }, (_, i) => (i * 7919 + salt * 977 + 13) % vocab);
}

export function argmaxRow(logits: Float32Array, row: number, vocab: number): number {
  let best = row * vocab;
  for (let i = best + 1; i < (row + 1) * vocab; i++) if (logits[i] > logits[best]) best = i;
  return best - row * vocab;
}

/** A plain-text table: the first `leftColumns` columns left-aligned, the rest right-aligned. */
export function formatTable(head: string[], rows: string[][], leftColumns = 2): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const fmt = (cells: string[]) => cells.map((c, i) => (i < leftColumns ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join("  ");
  return [fmt(head), ...rows.map(fmt)].join("\n");
}
