// Hugging Face tokenizer.json tokenizers (the GPT-NeoX byte-level BPE of the Mamba checkpoints, and
// whatever else @huggingface/tokenizers runs), checked first so that a broken file fails with a
// message naming the file and the field instead of failing inside the library or, worse, silently
// dropping text.
import * as fs from "fs";
import * as path from "path";
import { Tokenizer as LibraryTokenizer } from "@huggingface/tokenizers";
import { byteLevelToBytes, BYTE_TO_CHAR } from "./byte-level";
import { checkTokenId, checkTokenIds, DecodeOptions, EncodeOptions, Tokenizer } from "./tokenizer";
import { encodeUtf8 } from "./utf8";

/** An entry of tokenizer.json's added_tokens. */
export interface TokenizerJsonAddedToken {
  id: number;
  content: string;
  single_word?: boolean;
  lstrip?: boolean;
  rstrip?: boolean;
  normalized?: boolean;
  special?: boolean;
}

/** The parts of tokenizer.json read here; the rest goes to the library as it is. */
export interface TokenizerJson {
  version?: string;
  added_tokens?: TokenizerJsonAddedToken[];
  normalizer?: { type: string; [key: string]: unknown } | null;
  pre_tokenizer?: { type: string; [key: string]: unknown } | null;
  post_processor?: { type: string; [key: string]: unknown } | null;
  decoder?: { type: string; [key: string]: unknown } | null;
  model: {
    type?: string;
    vocab?: Record<string, number> | unknown;
    merges?: (string | [string, string])[];
    unk_token?: string | null;
    byte_fallback?: boolean;
    [key: string]: unknown;
  };
  [key: string]: unknown;
}

export interface TokenizerJsonOptions {
  /** Where the object came from, named in error messages. Default "tokenizer.json". */
  source?: string;
  bosTokenId?: number;
  eosTokenId?: number;
  /**
   * The model's vocabulary size when it is padded beyond the tokenizer's (mamba-130m: 50280 rows for
   * 50277 tokens). Ids up to it are accepted; ids that name no token decode to nothing.
   */
  vocabSize?: number;
}

type JsonObject = Record<string, unknown>;

// Objects checkTokenizerJson made (it returns a new object), so that a checked object handed on is
// not checked again: the merge checks of a 50k-merge vocabulary take a noticeable fraction of a second.
const checked = new WeakSet<object>();

function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function describe(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "an array";
  if (typeof value === "string") return `the string ${JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value)}`;
  return typeof value === "object" ? "an object" : `${typeof value} ${String(value)}`;
}

/** Whether a component (decoder, pre-tokenizer) is ByteLevel or a Sequence holding one. */
function hasComponent(component: unknown, type: string): boolean {
  if (!isObject(component)) return false;
  if (component.type === type) return true;
  for (const key of ["decoders", "pretokenizers", "normalizers", "processors"]) {
    const parts = component[key];
    if (Array.isArray(parts) && parts.some((part) => hasComponent(part, type))) return true;
  }
  return false;
}

function mergePair(merge: unknown): [string, string] | undefined {
  if (typeof merge === "string") {
    // The old form "left right": exactly one space, which a byte-level vocabulary spells as 'Ġ'
    // inside tokens, so it can only be the separator.
    const parts = merge.split(" ");
    if (parts.length === 2 && parts[0] !== "" && parts[1] !== "") return [parts[0], parts[1]];
    return undefined;
  }
  if (Array.isArray(merge) && merge.length === 2 && typeof merge[0] === "string" && typeof merge[1] === "string"
    && merge[0] !== "" && merge[1] !== "") {
    return [merge[0], merge[1]];
  }
  return undefined;
}

/**
 * Checks a parsed tokenizer.json and returns the object to hand to the library: the fields it
 * requires present (null where the file leaves them out). Throws an Error naming `source` and the field.
 */
export function checkTokenizerJson(json: unknown, source: string): TokenizerJson {
  if (checked.has(json as object)) return json as TokenizerJson;
  if (!isObject(json)) throw new Error(`${source}: expected a tokenizer.json object, found ${describe(json)}`);
  const model = json.model;
  if (!isObject(model)) throw new Error(`${source}: "model" must be an object (the tokenizer model), found ${describe(model)}`);

  const addedTokens = json.added_tokens ?? [];
  if (!Array.isArray(addedTokens)) throw new Error(`${source}: "added_tokens" must be an array, found ${describe(addedTokens)}`);
  addedTokens.forEach((token: unknown, index) => {
    if (!isObject(token)) throw new Error(`${source}: added_tokens[${index}] must be an object, found ${describe(token)}`);
    if (!Number.isSafeInteger(token.id) || (token.id as number) < 0) {
      throw new Error(`${source}: added_tokens[${index}].id must be an integer >= 0, found ${describe(token.id)}`);
    }
    if (typeof token.content !== "string" || token.content === "") {
      throw new Error(`${source}: added_tokens[${index}].content must be a non-empty string, found ${describe(token.content)}`);
    }
  });

  const isBpe = model.type === "BPE" || (model.type === undefined && model.merges !== undefined);
  if (isBpe) {
    const vocab = model.vocab;
    if (!isObject(vocab)) throw new Error(`${source}: model.vocab must be an object of token → id, found ${describe(vocab)}`);
    for (const [token, id] of Object.entries(vocab)) {
      if (!Number.isSafeInteger(id) || (id as number) < 0) {
        throw new Error(`${source}: model.vocab[${JSON.stringify(token)}] is ${describe(id)}; token ids are integers >= 0`);
      }
    }
    const merges = model.merges ?? [];
    if (!Array.isArray(merges)) throw new Error(`${source}: model.merges must be an array, found ${describe(merges)}`);
    merges.forEach((merge: unknown, index) => {
      const pair = mergePair(merge);
      if (pair === undefined) {
        throw new Error(
          `${source}: model.merges[${index}] is ${describe(merge)}; a merge is "left right" (one space) or ["left", "right"]`,
        );
      }
      // The Rust library refuses merges whose parts or result are not tokens; so do we, with the index.
      for (const part of [pair[0], pair[1], pair[0] + pair[1]]) {
        if (!Object.hasOwn(vocab, part)) {
          throw new Error(
            `${source}: model.merges[${index}] (${JSON.stringify(pair[0])} + ${JSON.stringify(pair[1])}) ` +
              `needs the token ${JSON.stringify(part)}, which is not in model.vocab`,
          );
        }
      }
    });
    const unknown = model.unk_token;
    const byteLevel = hasComponent(json.pre_tokenizer, "ByteLevel") || hasComponent(json.decoder, "ByteLevel");
    if (byteLevel && (unknown === undefined || unknown === null) && model.byte_fallback !== true) {
      // Without an unknown token the library drops a piece it has no token for: text would vanish.
      BYTE_TO_CHAR.forEach((char, byte) => {
        if (!Object.hasOwn(vocab, char)) {
          throw new Error(
            `${source}: the byte-level vocabulary has no token for byte 0x${byte.toString(16).padStart(2, "0")} ` +
              `(${JSON.stringify(char)}), so text containing that byte could not be encoded`,
          );
        }
      });
    }
  }

  const result: TokenizerJson = {
    ...json,
    added_tokens: addedTokens as TokenizerJsonAddedToken[],
    normalizer: (json.normalizer ?? null) as TokenizerJson["normalizer"],
    pre_tokenizer: (json.pre_tokenizer ?? null) as TokenizerJson["pre_tokenizer"],
    post_processor: (json.post_processor ?? null) as TokenizerJson["post_processor"],
    decoder: (json.decoder ?? null) as TokenizerJson["decoder"],
    model: model as TokenizerJson["model"],
  };
  checked.add(result);
  return result;
}

/**
 * The BOS a TemplateProcessing post-processor puts first in a single sequence ("$A" preceded by a
 * special token, as Llama-style tokenizer.json files say), if the post-processor says so.
 */
function templateBosTokenId(postProcessor: unknown): number | undefined {
  if (!isObject(postProcessor)) return undefined;
  if (postProcessor.type === "Sequence" && Array.isArray(postProcessor.processors)) {
    for (const processor of postProcessor.processors) {
      const id = templateBosTokenId(processor);
      if (id !== undefined) return id;
    }
    return undefined;
  }
  if (postProcessor.type !== "TemplateProcessing" || !Array.isArray(postProcessor.single)) return undefined;
  const first: unknown = postProcessor.single[0];
  if (!isObject(first) || !isObject(first.SpecialToken) || !isObject(postProcessor.special_tokens)) return undefined;
  const special = postProcessor.special_tokens[first.SpecialToken.id as string];
  if (!isObject(special) || !Array.isArray(special.ids) || !Number.isSafeInteger(special.ids[0])) return undefined;
  return special.ids[0] as number;
}

const BYTE_FALLBACK_TOKEN = /^<0x([0-9A-Fa-f]{2})>$/;
const NO_BYTES = new Uint8Array(0);

export class HuggingFaceTokenizer implements Tokenizer {
  readonly vocabSize: number;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
  /** Where the tokenizer came from (a path or a description), as error messages name it. */
  readonly source: string;
  readonly #library: LibraryTokenizer;
  readonly #json: TokenizerJson;
  readonly #addedTokens = new Map<number, TokenizerJsonAddedToken>();
  readonly #byteLevel: boolean;
  readonly #byteFallback: boolean;
  readonly #bytes: (Uint8Array | undefined)[] = [];

  /** Use tokenizerFromJson or loadTokenizerJson. */
  constructor(json: unknown, options: TokenizerJsonOptions = {}) {
    const source = options.source ?? "tokenizer.json";
    this.source = source;
    this.#json = checkTokenizerJson(json, source);
    try {
      // clean_up_tokenization_spaces off: the Python-era clean-up (" ." → ".") would make decode
      // disagree with the bytes of the tokens, and so with streaming, and lose text on round trips.
      this.#library = new LibraryTokenizer(this.#json, { clean_up_tokenization_spaces: false });
    } catch (error) {
      throw new Error(`${source}: the tokenizer cannot be built: ${(error as Error).message}`);
    }
    for (const token of this.#json.added_tokens ?? []) this.#addedTokens.set(token.id, token);
    this.#byteLevel = hasComponent(this.#json.decoder, "ByteLevel");
    this.#byteFallback = hasComponent(this.#json.decoder, "ByteFallback");

    let tokenCount = 0;
    const vocab = this.#json.model.vocab;
    if (isObject(vocab)) for (const id of Object.values(vocab)) tokenCount = Math.max(tokenCount, (id as number) + 1);
    else if (Array.isArray(vocab)) tokenCount = vocab.length; // Unigram: [token, score] pairs, id = index
    for (const id of this.#addedTokens.keys()) tokenCount = Math.max(tokenCount, id + 1);
    if (options.vocabSize !== undefined) {
      if (!Number.isSafeInteger(options.vocabSize) || options.vocabSize < tokenCount) {
        throw new Error(
          `${source}: vocabSize ${String(options.vocabSize)} is smaller than the tokenizer's ${tokenCount} token ids`,
        );
      }
      tokenCount = options.vocabSize;
    }
    this.vocabSize = tokenCount;
    const bosTokenId = options.bosTokenId ?? templateBosTokenId(this.#json.post_processor);
    if (bosTokenId !== undefined) checkTokenId(bosTokenId, tokenCount, `${source} bosTokenId`);
    if (options.eosTokenId !== undefined) checkTokenId(options.eosTokenId, tokenCount, `${source} eosTokenId`);
    this.bosTokenId = bosTokenId;
    this.eosTokenId = options.eosTokenId;
  }

  encode(text: string, options: EncodeOptions = {}): number[] {
    if (typeof text !== "string") throw new TypeError(`${this.source}: encode takes a string, got ${typeof text}`);
    const encoding = this.#library.encode(text, { add_special_tokens: options.addSpecialTokens ?? true });
    encoding.ids.forEach((id, index) => {
      if (!Number.isInteger(id)) {
        throw new Error(
          `${this.source}: cannot encode the piece ${JSON.stringify(encoding.tokens[index])}: ` +
            `it is not in the vocabulary and the model has no unknown token`,
        );
      }
    });
    return encoding.ids;
  }

  decode(ids: readonly number[], options: DecodeOptions = {}): string {
    checkTokenIds(ids, this.vocabSize, `${this.source} decode`);
    // Ids of vocabulary padding name no token; they decode to nothing.
    const known = ids.filter((id) => this.#library.id_to_token(id) !== undefined);
    if (known.length === 0) return "";
    return this.#library.decode(known, {
      skip_special_tokens: options.skipSpecialTokens ?? false,
      clean_up_tokenization_spaces: false,
    });
  }

  tokenBytes(id: number): Uint8Array {
    checkTokenId(id, this.vocabSize, `${this.source} tokenBytes`);
    let bytes = this.#bytes[id];
    if (bytes === undefined) {
      bytes = this.#computeTokenBytes(id);
      this.#bytes[id] = bytes;
    }
    return bytes;
  }

  isSpecialToken(id: number): boolean {
    checkTokenId(id, this.vocabSize, `${this.source} isSpecialToken`);
    return this.#addedTokens.get(id)?.special === true;
  }

  /** The id of a token given as it is spelled in the vocabulary ("Ġthe", "<|endoftext|>"), if any. */
  tokenToId(token: string): number | undefined {
    return this.#library.token_to_id(token);
  }

  /** The vocabulary spelling of a token, if the id names one. */
  idToToken(id: number): string | undefined {
    checkTokenId(id, this.vocabSize, `${this.source} idToToken`);
    return this.#library.id_to_token(id);
  }

  /** The checked tokenizer.json object this tokenizer was built from (do not modify it). */
  get json(): TokenizerJson {
    return this.#json;
  }

  #computeTokenBytes(id: number): Uint8Array {
    // Added tokens are matched and decoded as plain text, never through the byte-level alphabet.
    const added = this.#addedTokens.get(id);
    if (added !== undefined) return encodeUtf8(added.content);
    const token = this.#library.id_to_token(id);
    if (token === undefined) return NO_BYTES;
    if (this.#byteLevel) return byteLevelToBytes(token);
    if (this.#byteFallback) {
      const match = BYTE_FALLBACK_TOKEN.exec(token);
      if (match !== null) return Uint8Array.of(parseInt(match[1], 16));
    }
    // Other decoders (Metaspace, WordPiece, …) produce whole characters per token: their text is exact,
    // except that context-dependent rules (a Metaspace's first-token space) see one token alone.
    return encodeUtf8(this.#library.decode([id], { clean_up_tokenization_spaces: false }));
  }
}

/** A tokenizer from a parsed tokenizer.json object. */
export function tokenizerFromJson(json: unknown, options: TokenizerJsonOptions = {}): HuggingFaceTokenizer {
  return new HuggingFaceTokenizer(json, options);
}

function readJsonFile(file: string, optional: boolean): unknown {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") {
      if (optional) return undefined;
      throw new Error(`${file}: file not found`);
    }
    throw new Error(`${file}: cannot be read (${(error as Error).message})`);
  }
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${file}: not valid JSON (${(error as Error).message})`);
  }
}

/** The id of a token spelled `content` in the tokenizer.json object (added tokens first). */
function idOfToken(json: TokenizerJson, content: string): number | undefined {
  const added = json.added_tokens?.find((token) => token.content === content);
  if (added !== undefined) return added.id;
  const vocab = json.model.vocab;
  if (isObject(vocab) && Object.hasOwn(vocab, content)) return vocab[content] as number;
  return undefined;
}

type SpecialTokenIds = { bosTokenId?: number; eosTokenId?: number };

/** bos_token_id / eos_token_id of generation_config.json: an id or a list (the first is taken). */
function idsFromGenerationConfig(config: unknown, file: string): SpecialTokenIds {
  if (config === undefined) return {};
  if (!isObject(config)) throw new Error(`${file}: expected a JSON object, found ${describe(config)}`);
  const read = (key: string): number | undefined => {
    let value = config[key];
    if (Array.isArray(value)) value = value[0];
    if (value === undefined || value === null) return undefined;
    if (!Number.isSafeInteger(value) || (value as number) < 0) {
      throw new Error(`${file}: ${key} must be a token id (an integer >= 0) or a list of them, found ${describe(config[key])}`);
    }
    return value as number;
  };
  return { bosTokenId: read("bos_token_id"), eosTokenId: read("eos_token_id") };
}

/** bos_token / eos_token of tokenizer_config.json or special_tokens_map.json: a string or {content}. */
function idsFromTokenNames(config: unknown, file: string, json: TokenizerJson, tokenizerFile: string): SpecialTokenIds {
  if (config === undefined) return {};
  if (!isObject(config)) throw new Error(`${file}: expected a JSON object, found ${describe(config)}`);
  const read = (key: string): number | undefined => {
    const value = config[key];
    if (value === undefined || value === null) return undefined;
    const content = typeof value === "string" ? value : isObject(value) ? value.content : undefined;
    if (typeof content !== "string") {
      throw new Error(`${file}: ${key} must be a token string or {"content": string}, found ${describe(value)}`);
    }
    const id = idOfToken(json, content);
    if (id === undefined) throw new Error(`${file}: ${key} ${JSON.stringify(content)} is not a token of ${tokenizerFile}`);
    return id;
  };
  return { bosTokenId: read("bos_token"), eosTokenId: read("eos_token") };
}

/**
 * Loads tokenizer.json (a file, or a model folder holding one). BOS/EOS ids come from the options,
 * else from the files beside it, in this order: generation_config.json (the ids generation uses),
 * tokenizer_config.json, special_tokens_map.json.
 */
export function loadTokenizerJson(
  filePath: string,
  options: Omit<TokenizerJsonOptions, "source"> = {},
): HuggingFaceTokenizer {
  let file = filePath;
  try {
    if (fs.statSync(filePath).isDirectory()) file = path.join(filePath, "tokenizer.json");
  } catch {
    // A path that does not exist is reported by readJsonFile, naming it.
  }
  const json = checkTokenizerJson(readJsonFile(file, false), file);
  const folder = path.dirname(file);
  const sidecars: SpecialTokenIds[] = [];
  const generationFile = path.join(folder, "generation_config.json");
  sidecars.push(idsFromGenerationConfig(readJsonFile(generationFile, true), generationFile));
  for (const name of ["tokenizer_config.json", "special_tokens_map.json"]) {
    const sidecar = path.join(folder, name);
    sidecars.push(idsFromTokenNames(readJsonFile(sidecar, true), sidecar, json, file));
  }
  const bosTokenId = options.bosTokenId ?? sidecars.map((ids) => ids.bosTokenId).find((id) => id !== undefined);
  const eosTokenId = options.eosTokenId ?? sidecars.map((ids) => ids.eosTokenId).find((id) => id !== undefined);
  return new HuggingFaceTokenizer(json, { ...options, source: file, bosTokenId, eosTokenId });
}
