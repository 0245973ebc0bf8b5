// Memory-mapped files (native/napi/mapfile.cpp): one private, copy-on-write mapping of a file, seen
// through one ArrayBuffer per byte range. The mapping lives until every one of those buffers has been
// freed (Tensor.dispose) or collected, so tensors over it may outlive the loader that made them.
import * as fs from "fs";
import { DType } from "../dtype";
import { native, NativeAddon } from "../native";
import { Shape, Tensor } from "../tensor";

/** A byte range of a file: [offset, length]. */
export type FileRange = readonly [number, number];

interface MapFileAddon extends NativeAddon {
  mapFile(args: { path: string; ranges: FileRange[] }): ArrayBuffer[];
}

function addon(): MapFileAddon {
  return native() as MapFileAddon;
}

/**
 * Maps `path` once and returns one ArrayBuffer per range, in order, without copying. Writes to them
 * change private copies of the pages, never the file. Throws naming the file for a missing file, a
 * permission error or a range beyond its end.
 */
export function mapFileRanges(path: string, ranges: readonly FileRange[]): ArrayBuffer[] {
  return addon().mapFile({ path, ranges: ranges.map((r) => [r[0], r[1]] as const) });
}

/** A tensor request for mapTensors: where its bytes lie in the file and what they are. */
export interface MappedTensorSpec {
  offset: number;
  dtype: DType;
  shape: Shape;
  byteLength: number;
}

/** Tensors over one mapping of `path`; each is released independently with dispose(). */
export function mapTensors(path: string, specs: readonly MappedTensorSpec[]): Tensor[] {
  const buffers = mapFileRanges(
    path,
    specs.map((s) => [s.offset, s.byteLength] as const),
  );
  const tensors: Tensor[] = [];
  try {
    for (let i = 0; i < specs.length; i++) {
      tensors.push(Tensor.fromArrayBuffer(buffers[i], specs[i].dtype, specs[i].shape));
    }
  } catch (err) {
    // Release what was mapped so the mapping does not wait for the garbage collector.
    for (const b of buffers) native().free(b);
    throw err;
  }
  return tensors;
}

/** The size of a file, with an Error naming it when it cannot be read. */
export function fileSize(path: string): number {
  try {
    const st = fs.statSync(path);
    if (!st.isFile()) throw new Error(`${path} is not a regular file`);
    return st.size;
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === "ENOENT") throw new Error(`${path}: no such file`);
    if (e.code) throw new Error(`${path}: cannot read (${e.code}: ${e.message})`);
    throw err;
  }
}
