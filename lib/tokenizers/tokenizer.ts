// The one tokenizer interface the model runner, the generator and the streaming decoder use,
// whatever the vocabulary came from (raw bytes, a Hugging Face tokenizer.json, a GGUF file).

export interface EncodeOptions {
  /** Let the tokenizer's post-processor add its special tokens (BOS/EOS templates). Default true. */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** Leave out special tokens (EOS, padding, …). Default false. */
  skipSpecialTokens?: boolean;
}

export interface Tokenizer {
  /** Ids run from 0 to vocabSize - 1 (a padded vocabulary counts its padding). */
  readonly vocabSize: number;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;
  encode(text: string, options?: EncodeOptions): number[];
  decode(ids: readonly number[], options?: DecodeOptions): string;
  /**
   * The raw bytes the token stands for, which may be part of a UTF-8 character (byte-level BPE
   * tokens are byte strings). Concatenating the bytes of a sequence and decoding them as UTF-8 gives
   * decode() of that sequence. Ids that name no token (vocabulary padding) give no bytes.
   */
  tokenBytes(id: number): Uint8Array;
  /** Whether the id is a special token (one that decode with skipSpecialTokens leaves out). */
  isSpecialToken(id: number): boolean;
}

/** Throws a RangeError unless `id` is an integer id of a vocabulary of `vocabSize` tokens. */
export function checkTokenId(id: number, vocabSize: number, what: string): void {
  if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
    throw new RangeError(`${what}: token id ${String(id)} is outside the vocabulary [0, ${vocabSize})`);
  }
}

/** Like checkTokenId for every id of a sequence; the message names the position. */
export function checkTokenIds(ids: readonly number[], vocabSize: number, what: string): void {
  if (!Array.isArray(ids)) throw new TypeError(`${what}: ids must be an array of token ids, got ${typeof ids}`);
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new RangeError(
        `${what}: token id ${String(id)} at position ${i} is outside the vocabulary [0, ${vocabSize})`,
      );
    }
  }
}
