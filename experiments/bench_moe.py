r"""One DeepSeekMoE layer, forward + backward: sorted grouped matmuls on one device ("single"),
expert-parallel over a mesh ("ep"), and the dense one-hot baseline ("dense").

    python experiments/bench_moe.py                      # small preset's MoE, 8 x 256 tokens, CPU
    python experiments/bench_moe.py --paths=single,ep --ep=8 --steps=20
    python experiments/bench_moe.py --dtype=bfloat16 --batch=32 --seq_len=1024   # accelerator

The layer is ``model.moe.MoE`` with V3 routing (sigmoid, router bias, top-2-sum group score,
normalised top-k, routed scale 2.5), dropless. Each path times
jit(value_and_grad(sum(y * w), (params, x))) for a fixed random w:
  single  no mesh: routing + sorted grouped-matmul experts + shared expert, one device.
  ep      under jax.set_mesh(expert=--ep, data=devices/--ep): the routed experts run in
          shard_map with all-to-all dispatch/combine (parallel/expert_parallel.py), exchange
          "auto" ("padded" all_to_all on CPU, ragged_all_to_all elsewhere).
  dense   moe.moe_dense_oracle: every expert on every token, combined by a dense [T, E] gate
          matrix, plus the same router and shared expert, one device (E/K times the routed FLOPs).
All three compute the same function; the table shows max |y - y_single|.
Reported: median ms per step over --steps after --warmup, and "useful" FLOP/s: the FLOPs of
the routed top-K experts, the shared experts and the router, x3 for forward + backward, over
the step time; the same numerator for every path, so the dense path's extra work shows as a
lower rate. For ep: dispatch rows per token (a token goes once to each shard holding one of its
experts) against the group-limit bound ``max_shards_per_token``, the dispatch bytes per token
(rows x (D x itemsize + K x 8 bytes of slot metadata: int32 id + f32 weight)), and overflow.
On a CPU-only host --cpu_devices fake devices are created (XLA_FLAGS, before JAX starts); they
share the host's cores, so ep on CPU measures overhead, not speed-up.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

from absl import app, flags

_D_MODEL = flags.DEFINE_integer("d_model", 256, "D")
_EXPERTS = flags.DEFINE_integer("experts", 32, "E, routed experts")
_SHARED = flags.DEFINE_integer("shared", 1, "shared experts")
_TOP_K = flags.DEFINE_integer("top_k", 4, "K, routed experts per token")
_FFN = flags.DEFINE_integer("ffn", 128, "F, expert hidden size")
_GROUPS = flags.DEFINE_integer("groups", 4, "G, expert groups")
_LIMITED = flags.DEFINE_integer("limited_groups", 2, "M, groups a token may use")
_BATCH = flags.DEFINE_integer("batch", 8, "sequences")
_SEQ = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
_EP = flags.DEFINE_integer("ep", 4, "expert-parallel shards (mesh expert axis) for the ep path")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "activation / compute dtype (params float32)")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per path")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after compilation")
_PATHS = flags.DEFINE_list("paths", ["single", "ep", "dense"], "paths to time")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 8, "fake XLA:CPU devices (no effect on GPU)")

PATHS = ("single", "ep", "dense")


def _set_xla_flags() -> None:
  """Fake CPU devices and the CPU flags of experiments/train.py; before JAX starts."""
  flag = "--xla_force_host_platform_device_count"
  current = os.environ.get("XLA_FLAGS", "")
  if _CPU_DEVICES.value > 0 and flag not in current:
    os.environ["XLA_FLAGS"] = f"{current} {flag}={_CPU_DEVICES.value}".strip()
  from deepseek_jax.cli import set_cpu_xla_flags
  set_cpu_xla_flags()


def useful_flops(tokens: int, d: int, e: int, k: int, f: int, n_shared: int) -> float:
  """Forward + backward FLOPs of the work a token needs: K routed SwiGLUs, the shared ones, the
  router (x3: the backward pass is two matmuls per forward matmul)."""
  routed = tokens * k * 3 * 2 * d * f
  shared = tokens * 3 * 2 * d * n_shared * f
  router = tokens * 2 * d * e
  return 3.0 * (routed + shared + router)


def main(argv):
  del argv
  unknown = sorted(set(_PATHS.value) - set(PATHS))
  if unknown:
    raise app.UsageError(f"--paths: unknown {unknown}; choose from {list(PATHS)}")
  _set_xla_flags()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from deepseek_jax.model import moe
  from deepseek_jax.ops.matmul import weight_matmul
  from deepseek_jax.parallel import expert_parallel
  from deepseek_jax.parallel.mesh import BATCH_AXES, make_mesh
  from deepseek_jax.train.metrics import host_cpu_name, median_seconds

  d, e, k, f, n_shared = _D_MODEL.value, _EXPERTS.value, _TOP_K.value, _FFN.value, _SHARED.value
  g, m_groups, b, t, dtype = (_GROUPS.value, _LIMITED.value, _BATCH.value, _SEQ.value,
                              _DTYPE.value)
  tokens = b * t
  spec = moe.RoutingSpec(top_k=k, score_func="sigmoid", n_groups=g, n_limited_groups=m_groups,
                         group_score="top2_sum", norm_topk_prob=True, routed_scaling_factor=2.5)
  layer = moe.MoE(d, moe.ExpertSpec(e, n_shared, f), routing=spec,
                  balance=moe.BalanceSpec(router_bias=True, expert_coef=1e-4),
                  init_std=0.02, dtype=dtype, param_dtype="float32", rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (b, t, d), jnp.float32).astype(dtype)
  weight = jax.random.normal(kw, (b, t, d), jnp.float32)
  mask = jnp.ones((b, t), jnp.float32)

  def layer_loss(params, x, graphdef=graphdef):
    y, stats = nnx.merge(graphdef, params, rest)(x, mask)
    return (y.astype(jnp.float32) * weight).sum(), (y, stats)

  # The same layer with expert-parallel dispatch (chosen explicitly, not from the mesh).
  ep_layer = nnx.clone(layer)
  ep_layer.dispatch = dataclasses.replace(ep_layer.dispatch, mode="expert_parallel")
  ep_loss = functools.partial(layer_loss, graphdef=nnx.split(ep_layer, nnx.Param, ...)[0])

  def dense_loss(params, x):
    lay = nnx.merge(graphdef, params, rest)
    tok = x.reshape(tokens, d).astype(dtype)
    logits = weight_matmul("TD,DE->TE", tok, lay.gate, dtype=jnp.float32)
    routing = moe.route(logits, lay.router_bias[...], spec)
    w = [getattr(lay, n)[...].astype(dtype) for n in ("w_gate", "w_up", "w_down")]
    y = moe.moe_dense_oracle(tok, routing, *w)
    if lay.shared is not None:
      y = y + lay.shared(tok[None])[0]
    y = y.reshape(b, t, d)
    return (y.astype(jnp.float32) * weight).sum(), (y, {})

  n_dev = jax.device_count()
  dev0 = jax.devices()[0]
  itemsize = np.dtype(jnp.dtype(dtype)).itemsize
  flops = useful_flops(tokens, d, e, k, f, n_shared)
  results, ep_info = {}, None
  for path in (p for p in PATHS if p in _PATHS.value):
    loss = {"dense": dense_loss, "ep": ep_loss}.get(path, layer_loss)
    fn = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    if path == "ep":
      if n_dev % _EP.value or e % _EP.value or b % n_dev:
        raise app.UsageError(f"ep: --ep={_EP.value} must divide the {n_dev} devices and "
                             f"--experts={e}, and the devices must divide --batch={b}")
      mesh = make_mesh({"expert": _EP.value, "data": n_dev // _EP.value})
      expert_w = NamedSharding(mesh, PartitionSpec("expert"))
      replicated = NamedSharding(mesh, PartitionSpec())
      # Routed expert weights [E, ...] split over the expert axis; router, shared replicated.
      p_in = jax.tree.map(lambda a: jax.device_put(a, expert_w if a.ndim == 3 else replicated),
                          params)
      x_in = jax.device_put(x, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))

      def step(fn=fn, mesh=mesh, p_in=p_in, x_in=x_in):
        with jax.set_mesh(mesh):
          return jax.block_until_ready(fn(p_in, x_in))
    else:
      p_in, x_in = jax.device_put((params, x), dev0)

      def step(fn=fn, p_in=p_in, x_in=x_in):
        return jax.block_until_ready(fn(p_in, x_in))

    t0 = time.perf_counter()
    (_, (y, stats)), _ = step()
    first = time.perf_counter() - t0
    median = median_seconds(step, _WARMUP.value, _STEPS.value)
    results[path] = dict(ms=1e3 * median, first=first, y=np.asarray(y, np.float32),
                         devices=_EP.value * (n_dev // _EP.value) if path == "ep" else 1)
    if path == "ep":
      ep_info = dict(rows=float(stats["dispatch_per_token"]),
                     remote=float(stats["remote_per_token"]), overflow=float(stats["overflow"]),
                     exchange=expert_parallel.resolve_exchange("auto"),
                     bound=expert_parallel.max_shards_per_token(e, _EP.value, g, m_groups, k))

  print(f"# bench_moe: one DeepSeekMoE layer fwd+bwd, d_model={d} experts={e} shared={n_shared} "
        f"top_k={k} ffn={f} groups={g} limited_groups={m_groups} batch={b} seq_len={t} "
        f"(tokens={tokens}) dtype={dtype} ep={_EP.value} steps={_STEPS.value} "
        f"warmup={_WARMUP.value}")
  print(f"# hardware: {jax.default_backend()}:{dev0.device_kind} x{n_dev}, host CPU "
        f"{host_cpu_name()}, {os.cpu_count()} cores; jax {jax.__version__}")
  print(f"# useful FLOPs per step (fwd+bwd: routed top-{k} + shared + router): {flops / 1e9:.3f} G")
  for path, r in results.items():
    print(f"{path}: {r['ms']:.1f} ms/step (first call incl. compile {r['first']:.1f} s), "
          f"useful {flops / (r['ms'] / 1e3) / 1e9:.2f} GFLOP/s on {r['devices']} device(s)")
  if "dense" in results:
    dense_flops = flops + 3.0 * tokens * (e - k) * 3 * 2 * d * f
    actual = dense_flops / (results["dense"]["ms"] / 1e3) / 1e9
    print(f"dense: computes every expert on every token: routed FLOPs x{e / k:.1f} (E/K), total "
          f"x{dense_flops / flops:.2f} (actual {actual:.2f} GFLOP/s)")
  if ep_info is not None:
    row_bytes = d * itemsize + k * 8
    print(f"ep: mesh expert={_EP.value} data={n_dev // _EP.value}, exchange "
          f"{ep_info['exchange']}; dispatch rows/token {ep_info['rows']:.3f} (remote "
          f"{ep_info['remote']:.3f}), bound max_shards_per_token={ep_info['bound']}; bytes/token "
          f"{ep_info['rows'] * row_bytes:.0f} vs bound {ep_info['bound'] * row_bytes} "
          f"(row = {d} x {itemsize} B + {k} x 8 B); overflow {ep_info['overflow']:.0f}")
    if ep_info["exchange"] == "padded":
      print(f"    (padded all_to_all moves fixed slabs: {_EP.value} rows/token on the wire, "
            f"whatever the routing)")
  print(f"{'path':<8}{'devices':>8}{'ms/step':>10}{'useful GFLOP/s':>16}{'vs single':>11}"
        f"{'max|y-y_single|':>17}")
  ref = results.get("single")
  for path, r in results.items():
    speed = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
    err = f"{np.abs(r['y'] - ref['y']).max():.2e}" if ref else "-"
    print(f"{path:<8}{r['devices']:>8}{r['ms']:>10.1f}{flops / (r['ms'] / 1e3) / 1e9:>16.2f}"
          f"{speed:>11}{err:>17}")


if __name__ == "__main__":
  from deepseek_jax.cli import use_huge_pages
  use_huge_pages()  # restarts once, with malloc on transparent huge pages
  app.run(main)
