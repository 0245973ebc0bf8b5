// Streaming detokenization for generation: text comes out token by token, but a character's UTF-8
// bytes may be split across tokens (a byte tokenizer always splits non-ASCII characters; byte-level
// BPE often splits emoji and CJK). Working on bytes (Tokenizer.tokenBytes) rather than on decoded
// strings holds the partial character back instead of printing U+FFFD and then the character.
import { Tokenizer } from "./tokenizer";
import { Utf8StreamDecoder } from "./utf8";

export interface StreamDecoderOptions {
  /** Emit nothing for special tokens (EOS, padding, …). Default false, as Tokenizer.decode. */
  skipSpecialTokens?: boolean;
}

export class StreamDecoder {
  readonly #tokenizer: Tokenizer;
  readonly #skipSpecialTokens: boolean;
  readonly #utf8 = new Utf8StreamDecoder();

  constructor(tokenizer: Tokenizer, options: StreamDecoderOptions = {}) {
    this.#tokenizer = tokenizer;
    this.#skipSpecialTokens = options.skipSpecialTokens ?? false;
  }

  /**
   * Adds one token; returns the text of the characters it completes ("" while a character is
   * incomplete). Held bytes that can no longer complete come out as U+FFFD.
   */
  push(id: number): string {
    const bytes = this.#tokenizer.tokenBytes(id);
    if (this.#skipSpecialTokens && this.#tokenizer.isSpecialToken(id)) return "";
    return this.#utf8.push(bytes);
  }

  /** Ends the sequence: bytes of an unfinished character come out as U+FFFD. Ready for a new sequence. */
  flush(): string {
    return this.#utf8.finish();
  }

  /** Whether bytes of an unfinished character are held. */
  get pending(): boolean {
    return this.#utf8.pending;
  }
}
