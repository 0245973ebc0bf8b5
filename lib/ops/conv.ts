// Causal depthwise convolution over time (channels last), the sequence form and the one-token form.
import { native } from "../native";
import { Tensor } from "../tensor";
import { bufferOf, ShapeChecker } from "./check";

export interface Conv1dOptions {
  /** [channels] */
  bias?: Tensor | null;
  /** SiLU after the convolution (Mamba's conv is always followed by one). Default false. */
  silu?: boolean;
}

function weightShape(c: ShapeChecker, weight: unknown): { channels: number; kernel: number } {
  const w = c.tensor("weight", weight);
  // Accept PyTorch's [channels, 1, K] as well as [channels, K].
  if (w.shape.length === 3 && w.shape[1] === 1) return { channels: w.shape[0], kernel: w.shape[2] };
  c.shape("weight", w, ["channels", "kernel"]);
  return { channels: w.shape[0], kernel: w.shape[1] };
}

/**
 * y[b,t,c] = act(bias[c] + Σ_k weight[c,k] · xp[b,t+k,c]) with xp = concat(state, x) over time.
 * x [batch, length, channels]; weight [channels, K] (or [channels, 1, K]); state [batch, K-1, channels]
 * holds the inputs before x (absent: zeros). Returns y and the final state (the last K-1 inputs).
 */
export function conv1d(
  x: Tensor,
  weight: Tensor,
  options: Conv1dOptions & { state?: Tensor | null } = {},
): { y: Tensor; state: Tensor } {
  const c = new ShapeChecker("conv1d");
  const { channels, kernel } = weightShape(c, weight);
  c.bind("channels", channels, "weight");
  c.required("x", x, ["batch", "length", "channels"]);
  const batch = x.shape[0];
  const length = x.shape[1];
  if (batch === 0 || length === 0) c.fail(`x must have batch and length >= 1, got [${x.shape.join(", ")}]`);
  c.optional("bias", options.bias, ["channels"]);
  const stateIn = c.optional("state", options.state, [batch, kernel - 1, "channels"]);
  const y = Tensor.zeros(x.shape);
  const stateOut = Tensor.zeros([batch, kernel - 1, channels]);
  native().conv1d({
    x: x.buffer(),
    weight: weight.buffer(),
    bias: bufferOf(options.bias ?? null),
    stateIn: bufferOf(stateIn),
    stateOut: stateOut.buffer(),
    y: y.buffer(),
    batch,
    length,
    channels,
    kernel,
    silu: c.flag("silu", options.silu, false),
  });
  return { y, state: stateOut };
}

/** One token: x [batch, channels]; state [batch, K-1, channels] is updated in place. Returns y. */
export function conv1dStep(x: Tensor, weight: Tensor, state: Tensor, options: Conv1dOptions = {}): Tensor {
  const c = new ShapeChecker("conv1dStep");
  const { channels, kernel } = weightShape(c, weight);
  c.bind("channels", channels, "weight");
  c.required("x", x, ["batch", "channels"]);
  const batch = x.shape[0];
  c.required("state", state, [batch, kernel - 1, "channels"]);
  c.optional("bias", options.bias, ["channels"]);
  const y = Tensor.zeros(x.shape);
  native().conv1dStep({
    x: x.buffer(),
    weight: weight.buffer(),
    bias: bufferOf(options.bias ?? null),
    state: state.buffer(),
    y: y.buffer(),
    batch,
    channels,
    kernel,
    silu: c.flag("silu", options.silu, false),
  });
  return y;
}
