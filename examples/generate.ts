// Load a model, stream a continuation, then show the recurrent state at work.
//
//   npx ts-node -P tsconfig.test.json examples/generate.ts [MODEL] [PROMPT]
// MODEL defaults to the embedded byte-level model (models/default).
import * as path from "path";
import { loadModel } from "../lib";

async function main() {
  const modelPath = process.argv[2] ?? path.join(__dirname, "..", "models", "default");
  const prompt = process.argv[3] ?? "The Python ";
  const model = await loadModel(modelPath);
  console.log(`${model.config.architecture}, ${model.config.numLayers} layers, d_model ${model.config.hiddenSize}, vocabulary ${model.config.vocabSize}`);

  // Streaming generation.
  process.stdout.write(prompt);
  const it = model.generate(prompt, { maxTokens: 48, temperature: 0.7, seed: 1 });
  for (;;) {
    const r = await it.next();
    if (r.done) {
      console.log(`\n[${r.value.generatedTokens} tokens at ${r.value.decodeTokensPerSecond.toFixed(1)} tok/s, ${r.value.finishReason}]`);
      break;
    }
    process.stdout.write(r.value.text);
  }

  // The state after a prompt is a fixed-size snapshot: fork it and continue two ways.
  const ids = model.tokenizer.encode(prompt);
  const state = model.createState(1);
  const logits = await model.prefill(state, [ids]);
  const fork = state.clone();
  const a = await model.step(state, [ids[ids.length - 1]]);
  const b = await model.step(fork, [ids[ids.length - 1]]);
  const same = (a.data as Float32Array).every((v, i) => v === (b.data as Float32Array)[i]);
  console.log(`state: ${state.save().length} bytes; a cloned state continues identically: ${same}`);
  for (const t of [logits, a, b]) t.dispose();
  state.dispose();
  fork.dispose();
  model.dispose();
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
