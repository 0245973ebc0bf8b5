import * as fs from "fs";
import * as os from "os";
import * as path from "path";
import {
  BYTE_TO_CHAR,
  ByteTokenizer,
  decodeUtf8,
  GGUF_TOKEN_TYPE,
  HuggingFaceTokenizer,
  loadTokenizerFor,
  loadTokenizerJson,
  StreamDecoder,
  tokenizerFromGguf,
  tokenizerFromJson,
  tokenizerJsonToGgufVocab,
  Utf8StreamDecoder,
} from "../lib/tokenizers";
import type { Tokenizer, TokenizerJson } from "../lib/tokenizers";

// The fixture is a GPT-NeoX-shaped byte-level BPE: ids 0 and 1 are the special <|endoftext|> and
// <|padding|>, ids 2..257 the byte alphabet in byte order (byte b is id b + 2), then 25 merged tokens
// (hello, Ġworld, Ġthe, cafÃ© = "café", ðŁĺĢ = 😀, ä¸Ń = 中, æĸ = the first two bytes of 文, …),
// and two added whitespace runs ("    " 283, "  " 284) as GPT-NeoX has; an NFC normalizer.
const FIXTURE = path.join(__dirname, "fixtures", "tokenizer");
const FIXTURE_FILE = path.join(FIXTURE, "tokenizer.json");

const utf8 = (text: string): number[] => Array.from(new TextEncoder().encode(text));

/** mulberry32: a small seeded generator, so failures reproduce. */
function random(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Bytes that are mostly UTF-8-shaped (leads, continuations, the boundary values) so invalid cases are frequent but not trivial. */
function randomBytes(next: () => number, length: number): number[] {
  const interesting = [0x00, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xed, 0xef, 0xf0, 0xf4, 0xf5, 0xff];
  return Array.from({ length }, () => (next() < 0.5 ? interesting[Math.floor(next() * interesting.length)] : Math.floor(next() * 256)));
}

function streamAll(tokenizer: Tokenizer, ids: readonly number[], skipSpecialTokens = false): string[] {
  const stream = new StreamDecoder(tokenizer, { skipSpecialTokens });
  const pieces = ids.map((id) => stream.push(id));
  pieces.push(stream.flush());
  return pieces;
}

function tempFolder(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), "mamba-tokenizer-test-"));
}

const fixtureJson = (): TokenizerJson => JSON.parse(fs.readFileSync(FIXTURE_FILE, "utf8")) as TokenizerJson;

describe("UTF-8 decoding", () => {
  test("each maximal invalid subpart becomes one U+FFFD (WHATWG / Unicode substitution rule)", () => {
    const cases: [number[], string][] = [
      [[0x68, 0xc3, 0x28], "h\uFFFD("], // a 2-byte lead cut short by ASCII
      [[0xf0, 0x9f, 0x98], "\uFFFD"], // a truncated emoji is one subpart
      [[0xed, 0xa0, 0x80], "\uFFFD\uFFFD\uFFFD"], // a UTF-16 surrogate fails at its second byte
      [[0xc0, 0x80], "\uFFFD\uFFFD"], // overlong lead
      [[0xe0, 0x80, 0x80], "\uFFFD\uFFFD\uFFFD"], // overlong 3-byte form
      [[0xf4, 0x90, 0x80, 0x80], "\uFFFD\uFFFD\uFFFD\uFFFD"], // above U+10FFFF
      [[0xff, 0x41], "\uFFFDA"],
      [[0xef, 0xbb, 0xbf, 0x41], "\uFEFFA"], // a BOM is text here, not stripped
      [[0xf0, 0x9f, 0x98, 0x80, 0xe4, 0xb8, 0xad], "😀中"],
    ];
    for (const [bytes, expected] of cases) expect(decodeUtf8(bytes)).toBe(expected);
  });

  test("streaming random bytes in random pieces gives what TextDecoder gives for the whole", () => {
    const next = random(7);
    const reference = new TextDecoder("utf-8", { ignoreBOM: true });
    for (let trial = 0; trial < 1500; trial++) {
      const bytes = randomBytes(next, 1 + Math.floor(next() * 24));
      const decoder = new Utf8StreamDecoder();
      let text = "";
      for (let start = 0; start < bytes.length; ) {
        const end = Math.min(bytes.length, start + 1 + Math.floor(next() * 4));
        text += decoder.push(bytes.slice(start, end));
        start = end;
      }
      text += decoder.finish();
      expect(text).toBe(reference.decode(Uint8Array.from(bytes)));
    }
  });
});

describe("ByteTokenizer", () => {
  const bytes = new ByteTokenizer();

  test("encodes text as its UTF-8 bytes and decodes them back", () => {
    expect(bytes.vocabSize).toBe(256);
    expect(bytes.encode("aé😀")).toEqual([0x61, 0xc3, 0xa9, 0xf0, 0x9f, 0x98, 0x80]);
    for (const text of ["plain ASCII", "café naïve", "😀 emoji", "中文字符", "a\u0000b\n"]) {
      expect(bytes.decode(bytes.encode(text))).toBe(text);
    }
    expect(Array.from(bytes.tokenBytes(200))).toEqual([200]);
  });

  test("decodes invalid byte sequences with U+FFFD", () => {
    expect(bytes.decode([0x41, 0xff, 0xc3])).toBe("A\uFFFD\uFFFD");
    expect(bytes.decode([0xe4, 0xb8, 0x41])).toBe("\uFFFDA");
  });

  test("refuses ids outside 0..255, naming the id and its position", () => {
    expect(() => bytes.decode([65, 256])).toThrow(/token id 256 at position 1 is outside the vocabulary \[0, 256\)/);
    expect(() => bytes.decode([1.5])).toThrow(RangeError);
    expect(() => bytes.tokenBytes(-1)).toThrow(/token id -1/);
    expect(() => new ByteTokenizer({ eosTokenId: 300 })).toThrow(/eosTokenId: token id 300/);
  });
});

describe("tokenizer.json (byte-level BPE through @huggingface/tokenizers)", () => {
  const tokenizer = loadTokenizerJson(FIXTURE);
  const spell = (ids: number[]): (string | undefined)[] => ids.map((id) => tokenizer.idToToken(id));

  test("loads a model folder; BOS/EOS come from tokenizer_config.json", () => {
    expect(tokenizer).toBeInstanceOf(HuggingFaceTokenizer);
    expect(tokenizer.vocabSize).toBe(285);
    expect(tokenizer.bosTokenId).toBe(0);
    expect(tokenizer.eosTokenId).toBe(0);
    expect(tokenizer.source).toBe(FIXTURE_FILE);
  });

  test("applies the merges in rank order", () => {
    expect(tokenizer.encode("hello world")).toEqual([261, 270]);
    expect(spell(tokenizer.encode("hello world"))).toEqual(["hello", "Ġworld"]);
    expect(spell(tokenizer.encode(" the the"))).toEqual(["Ġthe", "Ġthe"]);
    // No merge joins 'Ġ' and 'c', so the space before café stays a token of its own.
    expect(spell(tokenizer.encode("the café"))).toEqual(["the", "Ġ", "cafÃ©"]);
    expect(spell(tokenizer.encode("😀中文"))).toEqual(["ðŁĺĢ", "ä¸Ń", "æĸ", "ĩ"]);
    // Unmerged bytes fall back to the byte alphabet: 'z' is byte 0x7a, id 0x7a + 2.
    expect(tokenizer.encode("zz")).toEqual([0x7a + 2, 0x7a + 2]);
  });

  test("round trips ASCII, accents, emoji, CJK, whitespace and special-token text", () => {
    const texts = [
      "hello world", "The quick brown fox, isn't it?", "café crème brûlée", "naïve Ünïcödé",
      "😀 👍🏽 🇺🇳", "中文字符 日本語 한국어", "tabs\tand\nnewlines\n\n", "a  b    c     d", "x<|endoftext|>y", "",
    ];
    for (const text of texts) expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
  });

  test("normalises to NFC before tokenising, as GPT-NeoX does", () => {
    const decomposed = "cafe\u0301";
    expect(tokenizer.encode(decomposed)).toEqual(tokenizer.encode("café"));
    expect(tokenizer.decode(tokenizer.encode(decomposed))).toBe("café");
  });

  test("added tokens are matched in the text before byte-level BPE; special ones can be skipped", () => {
    expect(tokenizer.encode("a  b    c")).toEqual([0x61 + 2, 284, 0x62 + 2, 283, 0x63 + 2]);
    const ids = tokenizer.encode("x<|endoftext|>y");
    expect(ids).toEqual([0x78 + 2, 0, 0x79 + 2]);
    expect(tokenizer.isSpecialToken(0)).toBe(true);
    expect(tokenizer.isSpecialToken(284)).toBe(false);
    expect(tokenizer.decode(ids, { skipSpecialTokens: true })).toBe("xy");
    expect(tokenizer.decode(ids)).toBe("x<|endoftext|>y");
  });

  test("tokenBytes maps the byte-level alphabet back to bytes", () => {
    expect(Array.from(tokenizer.tokenBytes(270))).toEqual(utf8(" world"));
    expect(Array.from(tokenizer.tokenBytes(tokenizer.tokenToId("æĸ")!))).toEqual([0xe6, 0x96]);
    expect(Array.from(tokenizer.tokenBytes(0x0a + 2))).toEqual([0x0a]);
    expect(Array.from(tokenizer.tokenBytes(0))).toEqual(utf8("<|endoftext|>"));
    expect(Array.from(tokenizer.tokenBytes(284))).toEqual(utf8("  "));
    // Every single-byte token stands for exactly its byte.
    for (let byte = 0; byte < 256; byte++) expect(Array.from(tokenizer.tokenBytes(byte + 2))).toEqual([byte]);
  });

  test("a padded model vocabulary accepts the padding ids, which decode to nothing", () => {
    const padded = loadTokenizerJson(FIXTURE_FILE, { vocabSize: 288 });
    expect(padded.vocabSize).toBe(288);
    expect(padded.decode([261, 286, 270])).toBe("hello world");
    expect(padded.tokenBytes(287).length).toBe(0);
    expect(() => padded.decode([288])).toThrow(/token id 288 at position 0 is outside the vocabulary \[0, 288\)/);
    expect(() => loadTokenizerJson(FIXTURE_FILE, { vocabSize: 100 })).toThrow(/vocabSize 100 is smaller than the tokenizer's 285/);
  });

  test("a TemplateProcessing post-processor adds its BOS unless addSpecialTokens is false, and names bosTokenId", () => {
    const json = fixtureJson();
    json.post_processor = {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<|padding|>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [],
      special_tokens: { "<|padding|>": { id: "<|padding|>", ids: [1], tokens: ["<|padding|>"] } },
    };
    const withBos = tokenizerFromJson(json);
    expect(withBos.bosTokenId).toBe(1);
    expect(withBos.eosTokenId).toBeUndefined();
    expect(withBos.encode("hello world")).toEqual([1, 261, 270]);
    expect(withBos.encode("hello world", { addSpecialTokens: false })).toEqual([261, 270]);
    expect(tokenizerFromJson(json, { bosTokenId: 0 }).bosTokenId).toBe(0);
  });

  test("generation_config.json ids win over tokenizer_config.json; explicit options win over both", () => {
    const folder = tempFolder();
    try {
      for (const name of ["tokenizer.json", "tokenizer_config.json"]) fs.copyFileSync(path.join(FIXTURE, name), path.join(folder, name));
      fs.writeFileSync(path.join(folder, "generation_config.json"), JSON.stringify({ eos_token_id: [1, 0] }));
      const fromFiles = loadTokenizerJson(folder);
      expect(fromFiles.eosTokenId).toBe(1);
      expect(fromFiles.bosTokenId).toBe(0); // generation_config.json has none: tokenizer_config.json's
      expect(loadTokenizerJson(folder, { eosTokenId: 283 }).eosTokenId).toBe(283);
    } finally {
      fs.rmSync(folder, { recursive: true, force: true });
    }
  });

  describe("errors name the file and what is wrong", () => {
    let folder: string;
    beforeEach(() => {
      folder = tempFolder();
    });
    afterEach(() => {
      fs.rmSync(folder, { recursive: true, force: true });
    });
    const write = (name: string, content: unknown): string => {
      const file = path.join(folder, name);
      fs.writeFileSync(file, typeof content === "string" ? content : JSON.stringify(content));
      return file;
    };
    const escaped = (file: string): string => file.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

    test("not JSON", () => {
      const file = write("tokenizer.json", '{"model": {"type": "BPE", ');
      expect(() => loadTokenizerJson(file)).toThrow(new RegExp(`${escaped(file)}: not valid JSON`));
    });

    test("no model", () => {
      const file = write("tokenizer.json", { added_tokens: [] });
      expect(() => loadTokenizerJson(file)).toThrow(new RegExp(`${escaped(file)}: "model" must be an object`));
    });

    test("a merge naming a token the vocabulary lacks", () => {
      const json = fixtureJson();
      (json.model.merges as string[]).push("hello Ġplanet");
      const file = write("tokenizer.json", json);
      expect(() => loadTokenizerJson(file)).toThrow(
        new RegExp(`${escaped(file)}: model.merges\\[25\\] \\("hello" \\+ "Ġplanet"\\) needs the token "Ġplanet"`),
      );
    });

    test("a malformed merge and a bad vocabulary id", () => {
      const json = fixtureJson();
      (json.model.merges as string[])[3] = "hello";
      expect(() => tokenizerFromJson(json, { source: "my.json" })).toThrow(/my.json: model.merges\[3\] is the string "hello"/);
      const badId = fixtureJson();
      (badId.model.vocab as Record<string, number>)["hello"] = -4;
      expect(() => tokenizerFromJson(badId)).toThrow(/tokenizer.json: model.vocab\["hello"\] is number -4/);
    });

    test("a byte-level vocabulary missing a byte, which would silently drop text", () => {
      const json = fixtureJson();
      delete (json.model.vocab as Record<string, number>)[BYTE_TO_CHAR[0x0a]];
      json.model.merges = (json.model.merges as string[]).filter((merge) => !merge.includes("Ċ"));
      const file = write("tokenizer.json", json);
      expect(() => loadTokenizerJson(file)).toThrow(new RegExp(`${escaped(file)}: .*no token for byte 0x0a`));
    });

    test("a sidecar naming an EOS token the vocabulary lacks; a missing file", () => {
      write("tokenizer.json", fs.readFileSync(FIXTURE_FILE, "utf8"));
      const sidecar = write("tokenizer_config.json", { eos_token: "</s>" });
      expect(() => loadTokenizerJson(folder)).toThrow(new RegExp(`${escaped(sidecar)}: eos_token "</s>" is not a token of`));
      const missing = path.join(folder, "nothing", "tokenizer.json");
      expect(() => loadTokenizerJson(missing)).toThrow(new RegExp(`${escaped(missing)}: file not found`));
    });
  });
});

describe("GGUF gpt2 vocabulary", () => {
  const fromJson = loadTokenizerJson(FIXTURE);

  /** The tokenizer.ggml.* arrays llama.cpp's converter writes for the fixture, worked out independently here. */
  function fixtureAsGguf(): { tokens: string[]; merges: string[]; tokenTypes: number[] } {
    const json = fixtureJson();
    const tokens: string[] = [];
    const tokenTypes: number[] = [];
    for (const [token, id] of Object.entries(json.model.vocab as Record<string, number>)) {
      tokens[id] = token;
      tokenTypes[id] = GGUF_TOKEN_TYPE.normal;
    }
    for (const added of json.added_tokens!) {
      tokens[added.id] = added.content;
      tokenTypes[added.id] = added.special ? GGUF_TOKEN_TYPE.control : GGUF_TOKEN_TYPE.userDefined;
    }
    return { tokens, merges: [...(json.model.merges as string[])], tokenTypes };
  }

  const corpus = [
    "hello world", "the café, the world", "cafe\u0301", "😀中文 ü", "a  b    c\n\nd", "x<|endoftext|>y<|padding|>",
    "Numbers 12345 and symbols #@!", "  leading and trailing  ", "中文字符😀😀", "",
  ];

  test("a GGUF vocabulary tokenises exactly as the tokenizer.json it came from", () => {
    const gguf = fixtureAsGguf();
    const fromGguf = tokenizerFromGguf({ ...gguf, bos: 0, eos: 0 });
    expect(fromGguf.vocabSize).toBe(285);
    expect(fromGguf.eosTokenId).toBe(0);
    for (const text of corpus) {
      const ids = fromGguf.encode(text);
      expect(ids).toEqual(fromJson.encode(text));
      expect(fromGguf.decode(ids)).toBe(fromJson.decode(ids));
    }
    for (let id = 0; id < 285; id++) {
      expect(fromGguf.tokenBytes(id)).toEqual(fromJson.tokenBytes(id));
      expect(fromGguf.isSpecialToken(id)).toBe(fromJson.isSpecialToken(id));
    }
  });

  test("tokenizer.json to GGUF arrays: normal, control, user-defined and padding tokens, merges, BOS/EOS", () => {
    const expected = fixtureAsGguf();
    const arrays = tokenizerJsonToGgufVocab(fromJson, { vocabSize: 288 });
    expect(arrays.tokens).toEqual([...expected.tokens, "[PAD285]", "[PAD286]", "[PAD287]"]);
    expect(arrays.tokenTypes).toEqual([...expected.tokenTypes, 5, 5, 5]);
    expect(arrays.tokenTypes.slice(0, 3)).toEqual([3, 3, 1]);
    expect(arrays.tokenTypes.slice(283, 285)).toEqual([4, 4]);
    expect(arrays.merges).toEqual(expected.merges);
    expect(arrays.merges[0]).toBe("l l");
    expect(arrays.bos).toBe(0);
    expect(arrays.eos).toBe(0);
    // Back again: the padded GGUF vocabulary keeps its size and tokenises the same.
    const back = tokenizerFromGguf(arrays);
    expect(back.vocabSize).toBe(288);
    expect(back.decode([261, 287])).toBe("hello");
    for (const text of corpus) expect(back.encode(text)).toEqual(fromJson.encode(text));
  });

  test("without token types, BOS and EOS are the control tokens", () => {
    const { tokens, merges } = fixtureAsGguf();
    const fromGguf = tokenizerFromGguf({ tokens, merges, eos: 0 });
    expect(fromGguf.isSpecialToken(0)).toBe(true);
    expect(fromGguf.encode("x<|endoftext|>")).toEqual([0x78 + 2, 0]);
  });

  test("malformed GGUF vocabularies are refused, naming the GGUF key", () => {
    const gguf = fixtureAsGguf();
    expect(() => tokenizerFromGguf({ ...gguf, tokenTypes: gguf.tokenTypes.slice(1) })).toThrow(
      /tokenizer.ggml.token_type has 284 entries for 285 tokens/,
    );
    expect(() => tokenizerFromGguf({ ...gguf, merges: ["l l", "ell"] })).toThrow(/tokenizer.ggml.merges\[1\] is "ell"/);
    const repeated = [...gguf.tokens];
    repeated[100] = repeated[99];
    expect(() => tokenizerFromGguf({ tokens: repeated, merges: [] }, { source: "model.gguf" })).toThrow(
      /model.gguf: tokenizer.ggml.tokens\[100\] repeats tokens\[99\]/,
    );
    expect(() => tokenizerFromGguf({ ...gguf, eos: 285 })).toThrow(/eos_token_id: token id 285/);
  });
});

describe("StreamDecoder", () => {
  const bytes = new ByteTokenizer();
  const bpe = loadTokenizerJson(FIXTURE);

  test("holds the bytes of an emoji and of a 3-byte character until they are complete", () => {
    expect(streamAll(bytes, utf8("😀"))).toEqual(["", "", "", "😀", ""]);
    expect(streamAll(bytes, utf8("中"))).toEqual(["", "", "中", ""]);
    expect(streamAll(bytes, utf8("a中b"))).toEqual(["a", "", "", "中", "b", ""]);
  });

  test("works on byte-level BPE tokens that split a character", () => {
    const ids = bpe.encode("ü文😀");
    expect(ids.map((id) => bpe.idToToken(id))).toEqual(["Ã", "¼", "æĸ", "ĩ", "ðŁĺĢ"]);
    expect(streamAll(bpe, ids)).toEqual(["", "ü", "", "文", "😀", ""]);
  });

  test("bytes that can no longer complete come out as U+FFFD at once; an open sequence on flush", () => {
    const stream = new StreamDecoder(bytes);
    expect(stream.push(0xe4)).toBe("");
    expect(stream.pending).toBe(true);
    expect(stream.push(0x41)).toBe("\uFFFDA");
    expect(stream.push(0x80)).toBe("\uFFFD");
    expect(stream.push(0xe4)).toBe("");
    expect(stream.push(0xb8)).toBe("");
    expect(stream.flush()).toBe("\uFFFD");
    // flush ends the sequence: the next one starts clean.
    expect(stream.pending).toBe(false);
    expect(stream.push(0x68)).toBe("h");
    expect(stream.flush()).toBe("");
  });

  test("the streamed pieces join to decode() of the whole sequence", () => {
    const next = random(11);
    for (let trial = 0; trial < 300; trial++) {
      const byteIds = randomBytes(next, 1 + Math.floor(next() * 16));
      expect(streamAll(bytes, byteIds).join("")).toBe(bytes.decode(byteIds));
      const bpeIds = Array.from({ length: 1 + Math.floor(next() * 12) }, () => Math.floor(next() * bpe.vocabSize));
      expect(streamAll(bpe, bpeIds).join("")).toBe(bpe.decode(bpeIds));
      expect(streamAll(bpe, bpeIds, true).join("")).toBe(bpe.decode(bpeIds, { skipSpecialTokens: true }));
    }
  });

  test("skipSpecialTokens leaves EOS out; ids outside the vocabulary throw", () => {
    const ids = bpe.encode("hello<|endoftext|>");
    expect(streamAll(bpe, ids, true)).toEqual(["hello", "", ""]);
    expect(streamAll(bpe, ids)).toEqual(["hello", "<|endoftext|>", ""]);
    expect(() => new StreamDecoder(bpe).push(285)).toThrow(/token id 285 is outside the vocabulary \[0, 285\)/);
  });
});

describe("loadTokenizerFor", () => {
  test("builds the tokenizer each source kind calls for", () => {
    const bytes = loadTokenizerFor({ kind: "bytes" });
    expect(bytes).toBeInstanceOf(ByteTokenizer);
    expect(bytes.encode("é")).toEqual([0xc3, 0xa9]);
    const json = loadTokenizerFor({ kind: "tokenizer.json", path: FIXTURE, vocabSize: 288 });
    expect(json.vocabSize).toBe(288);
    expect(json.encode("hello world")).toEqual([261, 270]);
    const arrays = tokenizerJsonToGgufVocab(loadTokenizerJson(FIXTURE));
    const gguf = loadTokenizerFor({ kind: "gguf", ...arrays });
    expect(gguf.encode("hello world")).toEqual([261, 270]);
    expect(gguf.bosTokenId).toBe(0);
    expect(() => loadTokenizerFor({ kind: "sentencepiece" } as never)).toThrow(/unknown tokenizer kind "sentencepiece"/);
  });
});
