"""A JAX reference for optolab's main-config training step: the speed yardstick of issue 20.

Rules:
- Standalone: imports neither optolab nor torch, and JAX is not a project dependency. Make its
  own environment once:
      python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install jax numpy
- One core, as the torch benchmarks measure: XLA's threading is turned off below, before jax is
  imported, and it runs pinned:
      taskset -c 1 /tmp/jaxenv/bin/python benchmarks/jax_reference.py [--json] [--no-clamp]
      taskset -c 1 /tmp/jaxenv/bin/python benchmarks/jax_reference.py --peak [--json]
      /tmp/jaxenv/bin/python benchmarks/jax_reference.py --check   # correctness sanity, untimed
- The model is protocols/singh2024/main.yaml on tasks/fewshot_singh2024.yaml, as
  optolab/model/transformer.py builds it: attention-only, 2 layers x 8 heads, d_model 64,
  pre-LN + final LN (eps 1e-5), interleaved (GPT-J) RoPE, no q/k/v/o biases, unembedding bias;
  input x1 l1 x2 l2 q from exemplars [32, 3, 512] (W_X + b_X) and labels [32, 2] (rows of W_L,
  which is the one-hot product); cross-entropy over targets [32, 5] whose non-query entries are
  -100 (ignored), as the trainer's loss; torch's Adam (lr 1e-5, betas 0.9/0.999, eps 1e-8).
- The clamp is optolab's {"kind": "set", "site": "pattern0", "heads": [2], "to": "previous_token"}
  (strength 1): layer 0 head 2's pattern is replaced by P[i, i-1] = 1 (i >= 1), P[0, 0] = 1,
  with jnp.where inside the jitted step, so no gradient reaches that head's scores.
- ``--bf16``: every product (the projections, the attention einsums, the unembedding) takes
  bfloat16 operands and accumulates into float32 (``preferred_element_type``); parameters, Adam,
  LN, softmax and the loss stay float32, as under torch's CPU autocast. ``--peak --bf16`` times
  the chained products in bfloat16.
- Timed: (a) step loop, a Python loop over a jitted step with donated params and optimizer
  state; (b) scan loop, one jitted lax.scan over a chunk of stacked batches. Batches are random
  (content does not change the speed), made with numpy and put on the device before timing.
  Each reports the median over chunks, after one warm-up chunk that compiles.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

# Must precede the jax import: XLA reads its flags once, when the backend starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

B, N_EX, N_LAB, D_IN, N_LABELS = 32, 3, 2, 512, 5
N_LAYERS, H, E, D = 2, 8, 8, 64
N = N_EX + N_LAB  # x1 l1 x2 l2 q
LR, B1, B2, EPS = 1e-5, 0.9, 0.999, 1e-8
IGNORE = -100
CLAMP_LAYER, CLAMP_HEAD = 0, 2
tmap = jax.tree_util.tree_map


def flops_per_step() -> int:
    """Matrix work of one training step, 2*m*n*k per product. Backward costs two products per
    forward one (input and weight gradients), except W_X, whose input is data (weight gradient
    only). Label lookup and RoPE/softmax/LN are not matmuls. Main config: 45,576,192."""
    t = B * N  # token rows
    x_map = 2 * B * N_EX * D_IN * D
    per_layer = 4 * (2 * t * D * D) + 2 * (2 * B * H * N * N * E)  # W_Q/K/V/O; q.k and pattern.v
    unembed = 2 * t * D * N_LABELS  # all positions, as the model computes them
    return 2 * x_map + 3 * (N_LAYERS * per_layer + unembed)


def init_params(key) -> dict:
    """optolab's init_weights: +-2-truncated normals rescaled to std 1/sqrt(fan_in); embeddings 0.02."""
    keys = iter(jax.random.split(key, 4 + 4 * N_LAYERS))

    def tn(shape, std):
        return jax.random.truncated_normal(next(keys), -2.0, 2.0, shape) * (std / 0.87962566103423978)

    layers = [{"ln_w": jnp.ones(D), "ln_b": jnp.zeros(D), "W_Q": tn((D, H * E), D ** -0.5),
               "W_K": tn((D, H * E), D ** -0.5), "W_V": tn((D, H * E), D ** -0.5),
               "W_O": tn((H * E, D), D ** -0.5)} for _ in range(N_LAYERS)]
    return {"W_X": tn((D_IN, D), D_IN ** -0.5), "b_X": jnp.zeros(D),
            "W_L": tn((N_LABELS, D), 0.02 * 0.87962566103423978), "layers": layers,
            "lnf_w": jnp.ones(D), "lnf_b": jnp.zeros(D), "W_U": tn((D, N_LABELS), D ** -0.5),
            "b_U": jnp.zeros(N_LABELS)}


def _rope_tables() -> tuple[np.ndarray, np.ndarray]:
    # Pair (2i, 2i+1) at position p turns by p * 10000^(-2i/E) (kernels.rotary_table).
    inv_freq = 10000.0 ** (-np.arange(0, E, 2, dtype=np.float64) / E)
    ang = np.arange(N, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]


COS, SIN = _rope_tables()  # [pos, 1, E/2]
CAUSAL = np.tril(np.ones((N, N), dtype=bool))
PREV_TOKEN = np.eye(N, k=-1, dtype=np.float32)  # values.previous_token_pattern(5, 5, 1.0)
PREV_TOKEN[0, 0] = 1.0
CLAMP_HEADS = (np.arange(H) == CLAMP_HEAD)[:, None, None]  # [head, 1, 1]


def _ln(x, w, b):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * w + b


def _rope(x):  # [b, pos, head, E], interleaved pairs
    ev, od = x[..., 0::2], x[..., 1::2]
    return jnp.stack([ev * COS - od * SIN, ev * SIN + od * COS], axis=-1).reshape(x.shape)


PRODUCTS = {"dtype": None}  # --bf16: jnp.bfloat16 (set once in main, before anything is traced)


def mm(a, b):
    """A product as the step runs it: float32, or (``--bf16``) bfloat16 operands accumulated into
    float32, the master weights, Adam and the loss staying float32 (torch's CPU autocast)."""
    if PRODUCTS["dtype"] is None:
        return a @ b
    return jnp.matmul(a.astype(PRODUCTS["dtype"]), b.astype(PRODUCTS["dtype"]), preferred_element_type=jnp.float32)


def es(spec, a, b):
    if PRODUCTS["dtype"] is None:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a.astype(PRODUCTS["dtype"]), b.astype(PRODUCTS["dtype"]),
                      preferred_element_type=jnp.float32)


def loss_fn(params, batch, clamp: bool):
    ex_in, labels, targets = batch
    ex = mm(ex_in, params["W_X"]) + params["b_X"]  # [b, 3, D]
    lab = params["W_L"][labels]  # one-hot @ W_L, as a row lookup (what torch does too)
    pairs = jnp.stack([ex[:, :N_LAB], lab], axis=2).reshape(B, 2 * N_LAB, D)
    x = jnp.concatenate([pairs, ex[:, N_LAB:]], axis=1)
    for li, p in enumerate(params["layers"]):
        h = _ln(x, p["ln_w"], p["ln_b"])
        q, k, v = (mm(h, p[w]).reshape(B, N, H, E) for w in ("W_Q", "W_K", "W_V"))
        q, k = _rope(q), _rope(k)
        scores = es("bqhe,bkhe->bhqk", q, k) / math.sqrt(E)
        pattern = jax.nn.softmax(jnp.where(CAUSAL, scores, -jnp.inf), axis=-1)
        if clamp and li == CLAMP_LAYER:
            pattern = jnp.where(CLAMP_HEADS, PREV_TOKEN, pattern)
        z = es("bhqk,bkhe->bqhe", pattern, v).reshape(B, N, H * E)
        x = x + mm(z, p["W_O"])
    logits = mm(_ln(x, params["lnf_w"], params["lnf_b"]), params["W_U"]) + params["b_U"]
    keep = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.sum(keep)


def adam_init(params):
    return {"t": jnp.zeros((), jnp.int32), "m": tmap(jnp.zeros_like, params),
            "v": tmap(jnp.zeros_like, params)}


def _update(params, opt, batch, clamp: bool):
    loss, g = jax.value_and_grad(loss_fn)(params, batch, clamp)
    t = opt["t"] + 1
    bc1, bc2_sqrt = 1 - B1 ** t.astype(jnp.float32), jnp.sqrt(1 - B2 ** t.astype(jnp.float32))
    m = tmap(lambda m, g: B1 * m + (1 - B1) * g, opt["m"], g)
    v = tmap(lambda v, g: B2 * v + (1 - B2) * g * g, opt["v"], g)
    # torch.optim.Adam's formula, so both take the same steps: p -= lr/bc1 m / (sqrt(v/bc2) + eps)
    params = tmap(lambda p, m, v: p - (LR / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + EPS), params, m, v)
    return params, {"t": t, "m": m, "v": v}, loss


def make_step(clamp: bool):
    return jax.jit(lambda p, o, b: _update(p, o, b, clamp), donate_argnums=(0, 1))


def make_scan(clamp: bool):
    def run(params, opt, batches):
        def body(carry, batch):
            p, o, loss = _update(*carry, batch, clamp)
            return (p, o), loss
        (params, opt), losses = jax.lax.scan(body, (params, opt), batches)
        return params, opt, losses
    return jax.jit(run, donate_argnums=(0, 1))


def make_batches(steps: int, seed: int = 0, learnable: bool = False):
    """Stacked numpy batches [steps, ...]. ``learnable``: the query is a noisy copy of x1 or x2
    and its target is that exemplar's label (the few-shot rule), for the sanity check."""
    rng = np.random.default_rng(seed)
    ex = rng.standard_normal((steps, B, N_EX, D_IN), dtype=np.float32)
    labels = rng.integers(0, N_LABELS, (steps, B, N_LAB), dtype=np.int32)
    targets = np.full((steps, B, N), IGNORE, dtype=np.int32)
    which = rng.integers(0, N_LAB, (steps, B))
    targets[..., -1] = np.take_along_axis(labels, which[..., None], -1)[..., 0]
    if learnable:
        src = np.take_along_axis(ex, which[..., None, None], 2)[:, :, 0]
        ex[:, :, -1] = src + 0.25 * rng.standard_normal(src.shape, dtype=np.float32)
    return ex, labels, targets


def time_loops(clamp: bool, chunks: int, chunk_steps: int) -> tuple[float, float]:
    stacked = tuple(jax.device_put(a) for a in make_batches(chunk_steps))
    per_step = [tuple(a[i] for a in stacked) for i in range(chunk_steps)]  # sliced before timing
    step, scan = make_step(clamp), make_scan(clamp)

    def step_chunk(p, o):
        for b in per_step:
            p, o, loss = step(p, o, b)
        return jax.block_until_ready((p, o))

    def scan_chunk(p, o):
        return jax.block_until_ready(scan(p, o, stacked)[:2])

    rates = []
    for chunk in (step_chunk, scan_chunk):
        p = init_params(jax.random.PRNGKey(0))
        o = adam_init(p)
        p, o = chunk(p, o)  # warm-up: compiles
        times = []
        for _ in range(chunks):
            t0 = time.perf_counter()
            p, o = chunk(p, o)
            times.append(time.perf_counter() - t0)
        rates.append(chunk_steps / statistics.median(times))
    return rates[0], rates[1]


def matmul_peak(reps: int = 2000, dtype=jnp.float32) -> dict[str, float]:
    """Single-core GFLOP/s (float32, or ``dtype``) of the step's products at their shapes, each a chain of
    dependent products inside one jitted loop (so neither dispatch nor hoisting is measured).
    The weights are (semi-)orthogonal so the chained values neither blow up nor go denormal."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (m, k, n) in {"proj_160x64x64": (B * N, D, D), "xmap_96x512x64": (B * N_EX, D_IN, D)}.items():
        w = jnp.asarray(np.linalg.qr(rng.standard_normal((k, n)))[0], dtype)  # [k, n]
        x0 = jnp.asarray(rng.standard_normal((m, k)), dtype)
        if k == n:
            f = jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda _, x: x @ w, x))
            flop = 2 * m * k * n * reps
        else:  # there and back: [m,k]@[k,n] then [m,n]@[n,k], equal work
            f = jax.jit(lambda x, w: jax.lax.fori_loop(0, reps, lambda _, x: (x @ w) @ w.T, x))
            flop = 4 * m * k * n * reps
        jax.block_until_ready(f(x0, w))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(x0, w))
            times.append(time.perf_counter() - t0)
        out[name] = flop / statistics.median(times) / 1e9
    out["peak"] = max(out.values())
    return out


def check() -> None:
    """Loss falls on a fixed learnable batch, and the clamp changes the loss."""
    batch = tuple(jnp.asarray(a[0]) for a in make_batches(1, seed=1, learnable=True))
    for clamp in (False, True):
        p = init_params(jax.random.PRNGKey(0))
        o, step = adam_init(p), make_step(clamp)
        for i in range(2001):
            p, o, loss = step(p, o, batch)
            if i % 500 == 0:
                print(f"clamp={clamp} step {i}: loss {float(loss):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=7)
    ap.add_argument("--chunk-steps", type=int, default=200)
    ap.add_argument("--clamp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", action="store_true", help="print one JSON line for a driver")
    ap.add_argument("--peak", action="store_true", help="measure matmul GFLOP/s instead")
    ap.add_argument("--check", action="store_true", help="correctness sanity instead")
    ap.add_argument("--bf16", action="store_true", help="products in bfloat16 (float32 accumulation, weights, Adam)")
    a = ap.parse_args()
    if a.bf16:
        PRODUCTS["dtype"] = jnp.bfloat16
    if a.check:
        return check()
    if a.peak:
        r = {"matmul_gflops": matmul_peak(dtype=jnp.bfloat16 if a.bf16 else jnp.float32),
             "jax_version": jax.__version__, "bf16": a.bf16}
        return print(json.dumps(r) if a.json else
                     "\n".join(f"{k}: {v:.1f} GFLOP/s" for k, v in r["matmul_gflops"].items()))
    step_rate, scan_rate = time_loops(a.clamp, a.chunks, a.chunk_steps)
    r = {"jax_step_steps_per_s": step_rate, "jax_scan_steps_per_s": scan_rate,
         "jax_version": jax.__version__, "chunks": a.chunks, "chunk_steps": a.chunk_steps,
         "clamp": a.clamp, "flops_per_step": flops_per_step(), "bf16": a.bf16}
    f = r["flops_per_step"]
    print(json.dumps(r) if a.json else
          f"jax {jax.__version__}, clamp={a.clamp}, bf16={a.bf16}, median of {a.chunks} x {a.chunk_steps} steps\n"
          f"step loop: {step_rate:.1f} steps/s ({step_rate * f / 1e9:.1f} GFLOP/s)\n"
          f"scan loop: {scan_rate:.1f} steps/s ({scan_rate * f / 1e9:.1f} GFLOP/s)\n"
          f"matrix work: {f / 1e6:.2f} MFLOP/step")


if __name__ == "__main__":
    main()
