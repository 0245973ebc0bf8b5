// Mamba-1's selective scan (S6): the sequence form and the one-token state update.
import { native } from "../native";
import { Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";

export interface SelectiveScanInputs {
  /** [batch, length, channels] */
  u: Tensor;
  /** [batch, length, channels]: Δ before bias and softplus */
  delta: Tensor;
  /** [channels, state]: negative (A = -exp(A_log)) */
  A: Tensor;
  /** [batch, length, groups, state] (or [batch, length, state] for one group) */
  B: Tensor;
  /** same shape as B */
  C: Tensor;
  /** [channels]: the skip connection */
  D?: Tensor | null;
  /** [batch, length, channels]: the gate, y ·= silu(z) */
  z?: Tensor | null;
  /** [channels]: added to Δ before the softplus */
  deltaBias?: Tensor | null;
  /** Δ = softplus(Δ + bias). Default false. */
  deltaSoftplus?: boolean;
  /** [batch, channels, state]: the state before u (absent: zeros) */
  state?: Tensor | null;
}

/** One token: u, delta, z [batch, channels]; B, C [batch, groups, state]; the state is updated in place. */
export interface SelectiveStateUpdateInputs extends Omit<SelectiveScanInputs, "state"> {
  state: Tensor;
}

function groupsOf(c: ShapeChecker, name: string, t: unknown, lead: number): number {
  const tensor = c.tensor(name, t);
  return tensor.shape.length === lead + 2 ? tensor.shape[lead] : 1;
}

/** The inputs both forms pass to the kernel (already validated). */
function scanBuffers(c: ShapeChecker, inputs: Omit<SelectiveScanInputs, "state">) {
  return {
    u: inputs.u.buffer(),
    delta: inputs.delta.buffer(),
    A: inputs.A.buffer(),
    B: inputs.B.buffer(),
    C: inputs.C.buffer(),
    D: bufferOf(inputs.D ?? null),
    z: bufferOf(inputs.z ?? null),
    deltaBias: bufferOf(inputs.deltaBias ?? null),
    deltaSoftplus: c.flag("deltaSoftplus", inputs.deltaSoftplus, false),
  };
}

function bcDims(t: Tensor, lead: (number | string)[]): (number | string)[] {
  return t.shape.length === lead.length + 1 ? [...lead, "state"] : [...lead, "groups", "state"];
}

/**
 * s_t = exp(Δ_t·A) ⊙ s_{t-1} + (Δ_t·u_t) ⊗ B_t;  y_t = s_t·C_t + D ⊙ u_t;  y ·= silu(z).
 * Returns y [batch, length, channels] and the final state [batch, channels, state].
 */
export function selectiveScan(inputs: SelectiveScanInputs): { y: Tensor; state: Tensor } {
  const c = new ShapeChecker("selectiveScan");
  c.required("u", inputs.u, ["batch", "length", "channels"]);
  c.required("delta", inputs.delta, ["batch", "length", "channels"]);
  c.required("A", inputs.A, ["channels", "state"]);
  const groups = groupsOf(c, "B", inputs.B, 2);
  c.required("B", inputs.B, bcDims(inputs.B, ["batch", "length"]));
  c.required("C", inputs.C, inputs.B.shape);
  const [batch, length, channels] = inputs.u.shape;
  const state = c.size("state");
  if (batch === 0 || length === 0 || channels === 0 || state === 0) c.fail("sizes must be >= 1");
  if (channels % groups !== 0) c.fail(`channels ${channels} must be a multiple of the ${groups} groups of B and C`);
  c.optional("D", inputs.D, ["channels"]);
  c.optional("z", inputs.z, ["batch", "length", "channels"]);
  c.optional("deltaBias", inputs.deltaBias, ["channels"]);
  const stateIn = c.optional("state", inputs.state, ["batch", "channels", "state"]);
  const y = Tensor.zeros(inputs.u.shape);
  const stateOut = Tensor.zeros([batch, channels, state]);
  native().selectiveScan({
    batch, length, channels, state, groups,
    ...scanBuffers(c, inputs),
    stateIn: bufferOf(stateIn),
    stateOut: stateOut.buffer(),
    y: y.buffer(),
  });
  return { y, state: stateOut };
}

/** The decode form of selectiveScan: one token per sequence, state [batch, channels, state] updated in place. */
export function selectiveStateUpdate(inputs: SelectiveStateUpdateInputs): Tensor {
  const c = new ShapeChecker("selectiveStateUpdate");
  c.required("u", inputs.u, ["batch", "channels"]);
  c.required("delta", inputs.delta, ["batch", "channels"]);
  c.required("A", inputs.A, ["channels", "state"]);
  const groups = groupsOf(c, "B", inputs.B, 1);
  c.required("B", inputs.B, bcDims(inputs.B, ["batch"]));
  c.required("C", inputs.C, inputs.B.shape);
  const [batch, channels] = inputs.u.shape;
  const state = c.size("state");
  if (channels % groups !== 0) c.fail(`channels ${channels} must be a multiple of the ${groups} groups of B and C`);
  c.optional("D", inputs.D, ["channels"]);
  c.optional("z", inputs.z, ["batch", "channels"]);
  c.optional("deltaBias", inputs.deltaBias, ["channels"]);
  const s = c.required("state", inputs.state, ["batch", "channels", "state"]);
  const y = Tensor.zeros(inputs.u.shape);
  native().selectiveStateUpdate({
    batch, channels, state, groups,
    ...scanBuffers(c, inputs),
    stateIn: s.buffer(),
    stateOut: s.buffer(),
    y: y.buffer(),
  });
  return y;
}
