// Tokenizers: one interface over byte vocabularies, Hugging Face tokenizer.json and GGUF gpt2
// vocabularies, and the streaming decoder generation prints with.
import { ByteTokenizer } from "./byte";
import { GgufVocab, tokenizerFromGguf } from "./gguf";
import { loadTokenizerJson } from "./huggingface";
import { Tokenizer } from "./tokenizer";

export type { Tokenizer, EncodeOptions, DecodeOptions } from "./tokenizer";
export { ByteTokenizer } from "./byte";
export type { ByteTokenizerOptions } from "./byte";
export { HuggingFaceTokenizer, loadTokenizerJson, tokenizerFromJson } from "./huggingface";
export type { TokenizerJson, TokenizerJsonAddedToken, TokenizerJsonOptions } from "./huggingface";
export { GGUF_TOKEN_TYPE, ggufVocabToTokenizerJson, tokenizerFromGguf, tokenizerJsonToGgufVocab } from "./gguf";
export type { GgufVocab, GgufVocabArrays, GgufTokenizerOptions, TokenizerJsonToGgufOptions } from "./gguf";
export { StreamDecoder } from "./stream";
export type { StreamDecoderOptions } from "./stream";
export { Utf8StreamDecoder, decodeUtf8 } from "./utf8";
export { BYTE_TO_CHAR, CHAR_TO_BYTE } from "./byte-level";

/** Where a model's tokenizer comes from. */
export type TokenizerSource =
  | { kind: "tokenizer.json"; path: string; bosTokenId?: number; eosTokenId?: number; vocabSize?: number }
  | ({ kind: "gguf"; source?: string; normalizeNfc?: boolean } & GgufVocab)
  | { kind: "bytes"; bosTokenId?: number; eosTokenId?: number };

/** The tokenizer a model's files call for. */
export function loadTokenizerFor(source: TokenizerSource): Tokenizer {
  switch (source?.kind) {
    case "tokenizer.json":
      if (typeof source.path !== "string") throw new TypeError(`loadTokenizerFor: "tokenizer.json" needs a path string`);
      return loadTokenizerJson(source.path, {
        bosTokenId: source.bosTokenId,
        eosTokenId: source.eosTokenId,
        vocabSize: source.vocabSize,
      });
    case "gguf":
      return tokenizerFromGguf(source, { source: source.source, normalizeNfc: source.normalizeNfc });
    case "bytes":
      return new ByteTokenizer({ bosTokenId: source.bosTokenId, eosTokenId: source.eosTokenId });
    default:
      throw new Error(
        `loadTokenizerFor: unknown tokenizer kind ${JSON.stringify((source as { kind?: unknown } | undefined)?.kind)}; ` +
          `expected "tokenizer.json", "gguf" or "bytes"`,
      );
  }
}
