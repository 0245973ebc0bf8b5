// A whole Mamba-1 block assembled from ops (examples/mamba-block.ts) equals the block computed with
// the naive references, so the ops compose as the equations say.
import { mamba1Block, randomMamba1Weights } from "../examples/mamba-block";
import { Tensor } from "../lib";
import { conv1dRef, matmulRef, maxRelError, rmsnormRef, rmsOf, Rng, selectiveScanRef, silu } from "./reference";

test("a Mamba-1 block built from ops matches the reference block", () => {
  const [batch, length, dModel, dInner, N, dtRank, K] = [2, 7, 24, 40, 5, 3, 4];
  const w = randomMamba1Weights(dModel, dInner, N, dtRank, K, 3);
  const rng = new Rng(11);
  const hv = rng.normal(batch * length * dModel), rv = rng.normal(batch * length * dModel);
  const { out, residual } = mamba1Block(Tensor.from(hv, [batch, length, dModel]), Tensor.from(rv, [batch, length, dModel]), w);

  const rows = batch * length;
  const arr = (t: Tensor) => t.data as Float32Array;
  const sum = hv.map((v, i) => v + rv[i]);
  const normed = rmsnormRef(sum, arr(w.norm), rows, dModel, 1e-5);
  const xz = matmulRef(normed, arr(w.inProj), null, rows, 2 * dInner, dModel);
  const x = new Float64Array(rows * dInner), z = new Float64Array(rows * dInner);
  for (let r = 0; r < rows; r++) {
    x.set(xz.subarray(r * 2 * dInner, r * 2 * dInner + dInner), r * dInner);
    z.set(xz.subarray(r * 2 * dInner + dInner, (r + 1) * 2 * dInner), r * dInner);
  }
  const xc = conv1dRef(x, arr(w.conv), arr(w.convBias), null, batch, length, dInner, K, true).y;
  const dbc = matmulRef(xc, arr(w.xProj), null, rows, dtRank + 2 * N, dInner);
  const dtLow = new Float64Array(rows * dtRank), B = new Float64Array(rows * N), C = new Float64Array(rows * N);
  for (let r = 0; r < rows; r++) {
    const o = r * (dtRank + 2 * N);
    dtLow.set(dbc.subarray(o, o + dtRank), r * dtRank);
    B.set(dbc.subarray(o + dtRank, o + dtRank + N), r * N);
    C.set(dbc.subarray(o + dtRank + N, o + dtRank + 2 * N), r * N);
  }
  const delta = matmulRef(dtLow, arr(w.dtProj), null, rows, dInner, dtRank);
  const { y } = selectiveScanRef({
    u: xc, delta, A: arr(w.A), B, C, D: arr(w.D), z, deltaBias: arr(w.dtBias), softplus: true,
    batch, length, channels: dInner, N, groups: 1,
  });
  const want = matmulRef(y, arr(w.outProj), null, rows, dModel, dInner);
  expect(Array.from(residual.data)).toEqual(Array.from(sum));
  // Six fp32 ops in a chain: 2e-5 relative to |want| + 0.1·RMS of the output.
  expect(maxRelError(out.data, want, 0.1 * rmsOf(want))).toBeLessThan(2e-5);
  void silu;
});
