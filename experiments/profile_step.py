r"""Where a training step's time goes: each component of the model timed as its own compiled
sub-program, forward and backward, with its FLOPs and achieved GFLOP/s.

    python experiments/profile_step.py                                  # small, 8 x 256, CPU
    python experiments/profile_step.py --preset=tiny --batch=8 --seq_len=128
    python experiments/profile_step.py --grouped_matmul=ragged_dot      # another expert path

Each row is one piece of the step at the step's real shapes (one layer's worth), run as
``jax.jit(f)`` (forward) and ``jax.jit(vjp(f))`` (forward + backward, gradients for every
float input and weight), timed as the median of --steps calls after warm-up; "x" is how many
times the step runs it (layers), and the ms columns are per step (times x). FLOPs come from
XLA's own cost analysis of each compiled sub-program (so padding and gathered weights count),
for the forward and the forward + backward. The last rows compare the sum with the real jitted
train step (``bench_train``'s step): the gap is what fusion across components saves or costs,
plus residual adds, the scan over layers and the loss bookkeeping. The reference row is a
dense float32 matmul of the step's size, the rate the expert matmuls could reach.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "small", "model preset")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences per step")
_SEQ = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
_STEPS = flags.DEFINE_integer("steps", 7, "timed calls per sub-program (median)")
_GMM = flags.DEFINE_string("grouped_matmul", None, "override the routed experts' implementation")
_DTYPE = flags.DEFINE_string("dtype", None, "activation dtype (default: the preset's)")
_STEP = flags.DEFINE_bool("step", True, "also time the whole train step")


@dataclasses.dataclass
class Row:
  name: str
  times: int  # per step
  fwd_s: float
  fwd_bwd_s: float
  fwd_flops: float
  fwd_bwd_flops: float


def _median_s(fn: Callable, args, n: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _flops(fn: Callable, args) -> float:
  cost = fn.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def profile(name: str, times: int, f: Callable, *args, grad: bool = True) -> Row:
  """Time f(*args) forward and (if ``grad``) forward + backward w.r.t. every float leaf."""
  import jax
  import jax.numpy as jnp
  fwd = jax.jit(f)
  row = Row(name, times, _median_s(fwd, args, _STEPS.value), float("nan"), _flops(fwd, args),
            float("nan"))
  if grad:
    floating = lambda a: jnp.issubdtype(jnp.result_type(a), jnp.floating)
    diff = jax.tree.map(floating, args)

    def fwd_bwd(*args):
      wrt = [a for a, d in zip(jax.tree.leaves(args), jax.tree.leaves(diff)) if d]
      leaves, tree = jax.tree.flatten(args)

      def with_wrt(wrt):
        it = iter(wrt)
        return f(*jax.tree.unflatten(tree, [next(it) if d else a
                                            for a, d in zip(leaves, jax.tree.leaves(diff))]))
      out, vjp = jax.vjp(with_wrt, wrt)
      return vjp(jax.tree.map(jnp.ones_like, out))

    both = jax.jit(fwd_bwd)
    row.fwd_bwd_s = _median_s(both, args, _STEPS.value)
    row.fwd_bwd_flops = _flops(both, args)
  return row


def components(cfg, batch: int, seq: int) -> list[Row]:
  """One Row per component of ``cfg``'s train step at [batch, seq]."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from deepseek_jax.model import moe as moe_lib
  from deepseek_jax.model.attention import causal_self_attention
  from deepseek_jax.model.execution import resolve_execution
  from deepseek_jax.model.transformer import make_block
  from deepseek_jax.ops.grouped_matmul import default_tile, tile_matmul
  from deepseek_jax.ops.rows import gather_rows
  from deepseek_jax.train.loss import cross_entropy

  dtype = jnp.dtype(cfg.dtype)
  execution = resolve_execution(cfg)
  rngs = nnx.Rngs(0)
  key = iter(jax.random.split(jax.random.key(1), 16))
  b, t, d = batch, seq, cfg.d_model
  x = jax.random.normal(next(key), (b, t, d), dtype)
  tokens = jax.random.randint(next(key), (b, t), 0, cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  n_layers, n_moe = cfg.n_layers, cfg.n_moe_layers
  rows = []
  per = lambda shape: jax.random.normal(next(key), shape, dtype) * cfg.init_std

  # Embedding lookup, final norm, output head and cross-entropy.
  emb, head = per((cfg.vocab_size, d)), per((d, cfg.vocab_size))

  def embed_head_loss(emb, head, h):
    e = jnp.take(emb, tokens, axis=0)
    logits = jnp.einsum("BTD,DV->BTV", h + e, head, preferred_element_type=jnp.float32)
    total, count = cross_entropy(logits, tokens, jnp.ones((b, t)))
    return total / count
  rows.append(profile("embedding + output head + cross-entropy", 1, embed_head_loss, emb, head, x))

  block = make_block(cfg, moe=n_moe > 0, rngs=rngs, execution=execution)
  norm_graph, norm_state = nnx.split(block.attn_norm)
  rows.append(profile("RMSNorm [B,T,D] (2 per layer + final)", 2 * n_layers + 1,
                      lambda s, x: nnx.merge(norm_graph, s)(x), norm_state, x))

  # Attention: everything but the core, then the core.
  attn_graph, attn_state = nnx.split(block.attention)
  attn = block.attention
  mla = cfg.attention_kind == "mla"
  if mla:
    def projections(s, x, o):
      m = nnx.merge(attn_graph, s)
      q = m.query(x)
      q = jnp.concatenate([q[..., :m.nope_dim], m.rotary(q[..., m.nope_dim:], positions)], -1)
      c_kv, k_rope = m.latents(x, positions)
      k, v = m.expand(c_kv, k_rope, positions)
      return q, k, v, m._output(o)
    q, k, v, _ = jax.jit(projections)(attn_state, x, jnp.zeros((b, t, cfg.n_heads,
                                                                cfg.v_head_dim), dtype))
    rows.append(profile("attention projections + RoPE (q LoRA, kv_a, kv_norm, W_UK, W_UV, W_O)",
                        n_layers, projections, attn_state, x, jnp.ones_like(v)))
    rows.append(profile("attention core (QK^T, mask, softmax, PV)", n_layers,
                        lambda q, k, v: causal_self_attention(q, k, v, None, attn.scale, "xla"),
                        q, k, v))
  else:
    rows.append(profile("attention (whole layer)", n_layers,
                        lambda s, x: nnx.merge(attn_graph, s)(x, positions)[0], attn_state, x))

  if cfg.n_dense_layers:
    dense = make_block(cfg, moe=False, rngs=rngs, execution=execution).ffn
    g, s = nnx.split(dense)
    rows.append(profile(f"dense SwiGLU FFN (D={d}, F={cfg.dense_ffn_dim})", cfg.n_dense_layers,
                        lambda s, x: nnx.merge(g, s)(x), s, x))

  if n_moe:
    layer = block.ffn
    spec = layer.routing
    tokens_td = x.reshape(b * t, d)
    gate = layer.gate[...]
    bias = None if layer.router_bias is None else layer.router_bias[...]

    def router(gate, x):
      logits = jnp.einsum("TD,DE->TE", x.astype(jnp.float32), gate.astype(jnp.float32))
      r = moe_lib.route(logits, bias, spec)
      f, p = moe_lib.balance_fractions(r.scores.reshape(b, t, -1), r.experts.reshape(b, t, -1),
                                       jnp.ones((b, t)))
      return r.weights, moe_lib.expert_balance_loss(f, p)
    rows.append(profile("router (logits, sigmoid/softmax, group-limited top-k, balance loss)",
                        n_moe, router, gate, tokens_td))
    routing = jax.jit(lambda g, x: moe_lib.route(
        jnp.einsum("TD,DE->TE", x.astype(jnp.float32), g.astype(jnp.float32)), bias, spec))(
            gate, tokens_td)
    w = tuple(getattr(layer, n)[...] for n in ("w_gate", "w_up", "w_down"))
    impl = _GMM.value or layer.dispatch.grouped_matmul
    rows.append(profile(f"routed experts, whole ({impl}: sort, dispatch, 3 matmuls, combine)",
                        n_moe, lambda x, wt, w0, w1, w2: moe_lib.expert_ffn(
                            x, routing.experts, wt, w0, w1, w2, impl=impl)[0],
                        tokens_td, routing.weights, *w))
    if impl == "tiled":
      n_experts, m = w[0].shape[0], b * t * spec.top_k
      tile = default_tile(m, n_experts)

      def plan_of(experts):
        order, rank, bounds = moe_lib.sort_assignments(experts, n_experts, m)
        return moe_lib.tile_plan(order, rank, (bounds[1:] - bounds[:-1]).astype(jnp.int32),
                                 b * t, spec.top_k, tile)
      plan = jax.jit(plan_of)(routing.experts)
      rows.append(profile("  experts: sort + tile layout (index math)", n_moe, plan_of,
                          routing.experts, grad=False))
      x_tiles = jax.jit(lambda x: gather_rows(x, plan.token_of_slot, plan.slot_of_assignment))(
          tokens_td).reshape(-1, tile, d)
      rows.append(profile("  experts: gather tokens into tiles", n_moe,
                          lambda x: gather_rows(x, plan.token_of_slot, plan.slot_of_assignment),
                          tokens_td))

      def swiglu_tiles(xt, w0, w1, w2):
        h = jax.nn.silu(tile_matmul(xt, w0, plan.tile_group)) * tile_matmul(xt, w1, plan.tile_group)
        return tile_matmul(h, w2, plan.tile_group)
      rows.append(profile(f"  experts: 3 tile matmuls + SwiGLU ({x_tiles.shape[0]} tiles of "
                          f"{tile} rows)", n_moe, swiglu_tiles, x_tiles, *w))
      y_tiles = jax.jit(swiglu_tiles)(x_tiles, *w).reshape(-1, d)

      def combine(y, wt):
        out = gather_rows(y, plan.slot_of_assignment.reshape(-1), plan.assignment_of_slot[:, None])
        return jnp.einsum("TKD,TK->TD", out.reshape(b * t, spec.top_k, d).astype(jnp.float32),
                          wt)
      rows.append(profile("  experts: gather back + weighted combine", n_moe, combine, y_tiles,
                          routing.weights))
    if layer.shared is not None:
      g, s = nnx.split(layer.shared)
      rows.append(profile(f"shared expert SwiGLU (F={cfg.n_shared_experts * cfg.moe_ffn_dim})",
                          n_moe, lambda s, x: nnx.merge(g, s)(x), s, x))
  return rows


def optimizer_row(cfg) -> Row:
  import jax
  import optax
  from flax import nnx
  from deepseek_jax.model.transformer import create_model
  from deepseek_jax.train.config import default_config
  from deepseek_jax.train.optimizer import make_optimizer
  opt = default_config().optimizer
  opt.total_steps = 1000
  tx = make_optimizer(opt)
  params = nnx.state(create_model(cfg), nnx.Param)
  opt_state = tx.init(params)

  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  n = sum(a.size for a in jax.tree.leaves(params))
  return profile(f"optimizer (AdamW + clipping, {n / 1e6:.1f}M parameters)", 1, update, params,
                 opt_state, params, grad=False)


def whole_step(cfg, batch: int, seq: int) -> float:
  import jax
  from deepseek_jax.train.step import benchmark_train_step
  step_fn, state, data = benchmark_train_step(cfg, batch, seq)
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], data)
    return metrics
  for _ in range(2):
    jax.block_until_ready(step())
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  from deepseek_jax import cli
  cli.run_cli(_profile)  # bad input: one error line, not a traceback


def _profile():
  import os
  import jax
  import jax.numpy as jnp
  from deepseek_jax.config import ModelConfig
  from deepseek_jax.train.metrics import host_cpu_name
  overrides = dict(n_mtp_modules=0, max_seq_len=max(_SEQ.value,
                                                     ModelConfig.preset(_PRESET.value).max_seq_len))
  if _DTYPE.value:
    overrides["dtype"] = _DTYPE.value
  if _GMM.value:
    overrides["grouped_matmul"] = _GMM.value
  cfg = ModelConfig.preset(_PRESET.value, **overrides)
  b, t = _BATCH.value, _SEQ.value
  print(f"# profile_step: preset={cfg.name} batch={b} seq_len={t} dtype={cfg.dtype} (MTP off); "
        f"{jax.default_backend()}, host CPU {host_cpu_name()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}")
  rows = components(cfg, b, t) + [optimizer_row(cfg)]
  m, k, n = b * t, cfg.d_model, 3 * cfg.moe_ffn_dim
  a, c = jnp.ones((m, k)), jnp.ones((k, n))
  rows.append(profile(f"(reference: one dense f32 matmul [{m},{k}]x[{k},{n}])", 0,
                      lambda a, c: a @ c, a, c))
  header = (f"{'component':<74}{'x':>3}{'fwd ms':>9}{'bwd ms':>9}{'total ms':>10}{'share':>7}"
            f"{'GFLOP':>8}{'GFLOP/s':>9}")
  print(header)
  print("-" * len(header))
  total = sum(r.times * (r.fwd_bwd_s if r.fwd_bwd_s == r.fwd_bwd_s else r.fwd_s) for r in rows
              if not r.name.startswith("  "))
  for r in rows:
    both = r.fwd_bwd_s if r.fwd_bwd_s == r.fwd_bwd_s else r.fwd_s
    flops = r.fwd_bwd_flops if r.fwd_bwd_flops == r.fwd_bwd_flops else r.fwd_flops
    times = max(r.times, 1)
    bwd = max(both - r.fwd_s, 0.0) if r.fwd_bwd_s == r.fwd_bwd_s else 0.0  # timing noise
    share = f"{100 * times * both / total:6.1f}%" if r.times else "      "
    rate = (f"{times * flops / 1e9:>8.2f}{flops / both / 1e9:>9.1f}" if flops > 0 else
            f"{'-':>8}{'-':>9}")  # no FLOPs: data movement only
    print(f"{r.name:<74}{r.times:>3}{1e3 * times * r.fwd_s:>9.1f}{1e3 * times * bwd:>9.1f}"
          f"{1e3 * times * both:>10.1f}{share:>7}{rate}")
  print(f"{'sum of the components (indented rows are parts of the row above)':<74}{'':>3}"
        f"{'':>9}{'':>9}{1e3 * total:>10.1f}")
  if _STEP.value:
    step_s = whole_step(cfg, b, t)
    print(f"{'the jitted train step (bench_train), median':<74}{'':>3}{'':>9}{'':>9}"
          f"{1e3 * step_s:>10.1f}")
    print(f"{'difference (fusion across components, residuals, scan, loss bookkeeping)':<74}"
          f"{'':>3}{'':>9}{'':>9}{1e3 * (step_s - total):>10.1f}")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
