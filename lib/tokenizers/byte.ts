// The byte tokenizer of byte-level models (MambaByte): 256 tokens, token id = byte value, no tables.
import { checkTokenId, checkTokenIds, DecodeOptions, EncodeOptions, Tokenizer } from "./tokenizer";
import { decodeUtf8, encodeUtf8 } from "./utf8";

export interface ByteTokenizerOptions {
  /** Byte values the model was trained to use as BOS / EOS, if any (MambaByte uses none). */
  bosTokenId?: number;
  eosTokenId?: number;
}

const SINGLE_BYTES: readonly Uint8Array[] = Array.from({ length: 256 }, (_, byte) => Uint8Array.of(byte));

export class ByteTokenizer implements Tokenizer {
  readonly vocabSize = 256;
  readonly bosTokenId?: number;
  readonly eosTokenId?: number;

  constructor(options: ByteTokenizerOptions = {}) {
    if (options.bosTokenId !== undefined) checkTokenId(options.bosTokenId, 256, "ByteTokenizer bosTokenId");
    if (options.eosTokenId !== undefined) checkTokenId(options.eosTokenId, 256, "ByteTokenizer eosTokenId");
    this.bosTokenId = options.bosTokenId;
    this.eosTokenId = options.eosTokenId;
  }

  /**
   * The UTF-8 bytes of the text. A byte vocabulary has no special tokens to add, so
   * addSpecialTokens changes nothing; a caller that wants a BOS byte prepends bosTokenId.
   */
  encode(text: string, _options?: EncodeOptions): number[] {
    if (typeof text !== "string") throw new TypeError(`ByteTokenizer.encode: text must be a string, got ${typeof text}`);
    return Array.from(encodeUtf8(text));
  }

  /** UTF-8 decoding of the bytes; an invalid sequence becomes U+FFFD (one per maximal subpart). */
  decode(ids: readonly number[], _options?: DecodeOptions): string {
    checkTokenIds(ids, 256, "ByteTokenizer.decode");
    return decodeUtf8(ids);
  }

  tokenBytes(id: number): Uint8Array {
    checkTokenId(id, 256, "ByteTokenizer.tokenBytes");
    return SINGLE_BYTES[id];
  }

  isSpecialToken(id: number): boolean {
    checkTokenId(id, 256, "ByteTokenizer.isSpecialToken");
    return false;
  }
}
