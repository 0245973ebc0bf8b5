// GGUF "gpt2" vocabularies (tokenizer.ggml.model = "gpt2": byte-level BPE, what llama.cpp's converter
// writes for Mamba checkpoints) to and from tokenizer.json. The GGUF side is built into the
// equivalent tokenizer.json object and run by the same library, so a model loaded from GGUF
// tokenises exactly as the Hugging Face folder it was converted from.
//
// GGUF keys: tokenizer.ggml.tokens (string per id), tokenizer.ggml.token_type (llama.cpp's
// llama_token_type per id), tokenizer.ggml.merges ("left right" in rank order),
// tokenizer.ggml.bos_token_id / eos_token_id.
import { checkTokenizerJson, HuggingFaceTokenizer, TokenizerJson, TokenizerJsonAddedToken } from "./huggingface";
import { checkTokenId } from "./tokenizer";

/** tokenizer.ggml.token_type values (llama.cpp's llama_token_type). */
export const GGUF_TOKEN_TYPE = Object.freeze({
  normal: 1,
  unknown: 2,
  control: 3,
  userDefined: 4,
  unused: 5,
  byte: 6,
} as const);

/** The tokenizer.ggml.* arrays of a GGUF file. */
export interface GgufVocab {
  tokens: readonly string[];
  merges: readonly string[];
  tokenTypes?: readonly number[];
  bos?: number;
  eos?: number;
}

export interface GgufTokenizerOptions {
  /** Named in error messages. Default "GGUF vocabulary". */
  source?: string;
  /**
   * Apply NFC to the text before tokenising, as GPT-NeoX's tokenizer.json does (its "normalizer").
   * GGUF does not record normalizers; default true because the Mamba checkpoints use GPT-NeoX's.
   */
  normalizeNfc?: boolean;
}

// The byte-level components exactly as GPT-NeoX's tokenizer.json has them.
const BYTE_LEVEL = { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true };

/** Builds the tokenizer.json object equivalent to a GGUF gpt2 vocabulary. */
export function ggufVocabToTokenizerJson(vocab: GgufVocab, options: GgufTokenizerOptions = {}): TokenizerJson {
  const source = options.source ?? "GGUF vocabulary";
  const { tokens, merges, tokenTypes } = vocab;
  if (!Array.isArray(tokens) || tokens.length === 0) {
    throw new Error(`${source}: tokenizer.ggml.tokens must be a non-empty array of strings`);
  }
  if (!Array.isArray(merges)) throw new Error(`${source}: tokenizer.ggml.merges must be an array of strings`);
  if (tokenTypes !== undefined) {
    if (!Array.isArray(tokenTypes) || tokenTypes.length !== tokens.length) {
      throw new Error(
        `${source}: tokenizer.ggml.token_type has ${Array.isArray(tokenTypes) ? tokenTypes.length : "no"} entries ` +
          `for ${tokens.length} tokens; it needs one per token`,
      );
    }
  }
  if (vocab.bos !== undefined) checkTokenId(vocab.bos, tokens.length, `${source} tokenizer.ggml.bos_token_id`);
  if (vocab.eos !== undefined) checkTokenId(vocab.eos, tokens.length, `${source} tokenizer.ggml.eos_token_id`);

  const modelVocab: Record<string, number> = {};
  const addedTokens: TokenizerJsonAddedToken[] = [];
  const firstId = new Map<string, number>();
  tokens.forEach((token, id) => {
    if (typeof token !== "string") {
      throw new Error(`${source}: tokenizer.ggml.tokens[${id}] must be a string, found ${typeof token}`);
    }
    // Without token types, BOS and EOS are the only tokens known to be control tokens.
    const type = tokenTypes?.[id] ?? (id === vocab.bos || id === vocab.eos ? GGUF_TOKEN_TYPE.control : GGUF_TOKEN_TYPE.normal);
    if (!Number.isInteger(type) || type < 1 || type > 6) {
      throw new Error(`${source}: tokenizer.ggml.token_type[${id}] is ${String(type)}; token types are 1 to 6`);
    }
    if (type === GGUF_TOKEN_TYPE.unused) return; // padding rows: no token
    const earlier = firstId.get(token);
    if (earlier !== undefined) {
      throw new Error(
        `${source}: tokenizer.ggml.tokens[${id}] repeats tokens[${earlier}] (${JSON.stringify(token)}); ` +
          `a vocabulary names each token once`,
      );
    }
    firstId.set(token, id);
    if (type === GGUF_TOKEN_TYPE.control || type === GGUF_TOKEN_TYPE.userDefined) {
      // Control and user-defined tokens are matched in the raw text before byte-level splitting,
      // as tokenizer.json's added_tokens are; GPT-NeoX marks its whitespace runs normalized.
      const special = type === GGUF_TOKEN_TYPE.control;
      addedTokens.push({
        id,
        content: token,
        single_word: false,
        lstrip: false,
        rstrip: false,
        normalized: !special,
        special,
      });
    } else {
      modelVocab[token] = id;
    }
  });

  const mergePairs: [string, string][] = merges.map((merge, index) => {
    const parts = typeof merge === "string" ? merge.split(" ") : [];
    if (parts.length !== 2 || parts[0] === "" || parts[1] === "") {
      throw new Error(
        `${source}: tokenizer.ggml.merges[${index}] is ${JSON.stringify(merge)}; a merge is "left right" with one space`,
      );
    }
    return [parts[0], parts[1]];
  });

  const json: TokenizerJson = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer: options.normalizeNfc === false ? null : { type: "NFC" },
    pre_tokenizer: { ...BYTE_LEVEL },
    post_processor: { ...BYTE_LEVEL },
    decoder: { ...BYTE_LEVEL },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: modelVocab,
      merges: mergePairs,
    },
  };
  // Re-check as a tokenizer.json so that merges naming missing tokens fail here, naming the GGUF.
  return checkTokenizerJson(json, source);
}

/** A tokenizer from a GGUF gpt2 vocabulary; vocabSize is the number of GGUF tokens, padding included. */
export function tokenizerFromGguf(vocab: GgufVocab, options: GgufTokenizerOptions = {}): HuggingFaceTokenizer {
  const source = options.source ?? "GGUF vocabulary";
  const json = ggufVocabToTokenizerJson(vocab, { ...options, source });
  return new HuggingFaceTokenizer(json, {
    source,
    vocabSize: vocab.tokens.length,
    bosTokenId: vocab.bos,
    eosTokenId: vocab.eos,
  });
}

export interface TokenizerJsonToGgufOptions {
  /** Named in error messages. Default "tokenizer.json". */
  source?: string;
  /** Pad the vocabulary to the model's vocabulary size with unused "[PAD{id}]" tokens, as llama.cpp's converter does. */
  vocabSize?: number;
  bosTokenId?: number;
  eosTokenId?: number;
}

/** What a GGUF writer stores under tokenizer.ggml.* (model "gpt2"). */
export interface GgufVocabArrays {
  tokens: string[];
  merges: string[];
  tokenTypes: number[];
  bos?: number;
  eos?: number;
}

/**
 * The GGUF gpt2 vocabulary of a byte-level BPE tokenizer.json, following llama.cpp's converter:
 * model tokens are normal; added tokens are control when special (or spelled "<|…|>"), else
 * user-defined; ids without a token become "[PAD{id}]", unused; merges are "left right" strings.
 */
export function tokenizerJsonToGgufVocab(
  source: TokenizerJson | HuggingFaceTokenizer,
  options: TokenizerJsonToGgufOptions = {},
): GgufVocabArrays {
  const name = options.source ?? (source instanceof HuggingFaceTokenizer ? source.source : "tokenizer.json");
  const json = source instanceof HuggingFaceTokenizer ? source.json : checkTokenizerJson(source, name);
  const model = json.model;
  const isBpe = model.type === "BPE" || (model.type === undefined && model.merges !== undefined);
  const byteLevel = json.decoder?.type === "ByteLevel" && json.pre_tokenizer?.type === "ByteLevel";
  if (!isBpe || !byteLevel) {
    throw new Error(
      `${name}: only a byte-level BPE tokenizer (BPE model, ByteLevel pre-tokenizer and decoder) can be written ` +
        `as a GGUF gpt2 vocabulary; this one has model ${String(model.type)}, pre_tokenizer ` +
        `${String(json.pre_tokenizer?.type)}, decoder ${String(json.decoder?.type)}`,
    );
  }

  const byId = new Map<number, { token: string; type: number }>();
  for (const [token, id] of Object.entries(model.vocab as Record<string, number>)) {
    byId.set(id, { token, type: GGUF_TOKEN_TYPE.normal });
  }
  for (const added of json.added_tokens ?? []) {
    const looksSpecial = added.content.startsWith("<|") && added.content.endsWith("|>");
    byId.set(added.id, {
      token: added.content,
      type: added.special === true || looksSpecial ? GGUF_TOKEN_TYPE.control : GGUF_TOKEN_TYPE.userDefined,
    });
  }
  const tokenCount = Math.max(0, ...byId.keys()) + 1;
  const vocabSize = options.vocabSize ?? (source instanceof HuggingFaceTokenizer ? source.vocabSize : tokenCount);
  if (!Number.isSafeInteger(vocabSize) || vocabSize < tokenCount) {
    throw new Error(`${name}: vocabSize ${String(options.vocabSize)} is smaller than the tokenizer's ${tokenCount} token ids`);
  }

  const tokens: string[] = [];
  const tokenTypes: number[] = [];
  for (let id = 0; id < vocabSize; id++) {
    const entry = byId.get(id);
    tokens.push(entry?.token ?? `[PAD${id}]`);
    tokenTypes.push(entry?.type ?? GGUF_TOKEN_TYPE.unused);
  }

  const merges = (model.merges ?? []).map((merge, index) => {
    const [left, right] = typeof merge === "string" ? merge.split(" ") : merge;
    if (left.includes(" ") || right.includes(" ")) {
      // A GGUF merge string has one space as its separator; a token holding a space cannot be written.
      throw new Error(`${name}: model.merges[${index}] has a token containing a space, which a GGUF merge cannot hold`);
    }
    return `${left} ${right}`;
  });

  const bos = options.bosTokenId ?? (source instanceof HuggingFaceTokenizer ? source.bosTokenId : undefined);
  const eos = options.eosTokenId ?? (source instanceof HuggingFaceTokenizer ? source.eosTokenId : undefined);
  if (bos !== undefined) checkTokenId(bos, vocabSize, `${name} bosTokenId`);
  if (eos !== undefined) checkTokenId(eos, vocabSize, `${name} eosTokenId`);
  const result: GgufVocabArrays = { tokens, merges, tokenTypes };
  if (bos !== undefined) result.bos = bos;
  if (eos !== undefined) result.eos = eos;
  return result;
}
