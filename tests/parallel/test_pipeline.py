"""Pipeline parallelism on 8 fake CPU devices: the schedules' timetables (every micro-batch
forward and backward once per rank, in dependency order, the formulas' in-flight activations),
the runtime against a sequential reference, and the pipelined DeepSeek loss against
``PretrainLoss`` (loss, every gradient, the metrics) with the stage axis combined with data and
expert axes, for GPipe, 1F1B and DualPipe; uneven cuts; the trainer's flags and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.execution import resolve_execution
from deepseek_jax.model.transformer import create_model
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.pipeline import Schedule, analyse, run_pipeline, timetable
from deepseek_jax.train.loss import PretrainLoss
from deepseek_jax.train.pipeline import PipelinedPretrainLoss, StageCut, stage_layers

CASES = [("gpipe", 4, 8), ("gpipe", 2, 3), ("1f1b", 4, 8), ("1f1b", 8, 16), ("1f1b", 4, 2),
         ("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 8, 16), ("dualpipe", 8, 32),
         ("dualpipe", 6, 14)]


@pytest.mark.parametrize("name,pp,m", CASES)
def test_timetable_runs_each_micro_batch_once_in_dependency_order(name, pp, m):
  s = Schedule(name, pp, m)
  t = timetable(s)
  for r in range(pp):
    assert sorted(t.forward[:, r][t.forward[:, r] >= 0]) == list(range(m))
    assert sorted(t.backward[:, r][t.backward[:, r] >= 0]) == list(range(m))
  tick = lambda table, i, r: int(np.nonzero(table[:, r] == i)[0][0])
  for i in range(m):
    path = s.path(i)
    for a, b in zip(path, path[1:]):  # activations flow down the path, gradients back up
      assert tick(t.forward, i, a) < tick(t.forward, i, b)
      assert tick(t.backward, i, b) < tick(t.backward, i, a)
    for r in path[:-1]:
      assert tick(t.forward, i, r) < tick(t.backward, i, r)
  expected = {"gpipe": m, "1f1b": min(pp, m), "dualpipe": pp + 1}[name]
  assert analyse(s).activations == expected
  assert analyse(s).parameter_copies == (2 if name == "dualpipe" else 1)


def test_dualpipe_feeds_both_ends_and_overlaps_forward_with_backward():
  s = Schedule("dualpipe", 4, 8)
  t = timetable(s)
  assert {s.direction(i) for i in range(8)} == {0, 1}
  assert set(t.forward[0]) - {-1} and t.forward[0, 0] in range(4) and t.forward[0, 3] in range(
      4, 8)  # tick 0: rank 0 starts a direction-0 micro-batch, rank 3 a direction-1 one
  both = (t.forward >= 0) & (t.backward >= 0)
  assert both.sum() >= 8  # F&B pairs of different micro-batches in one tick
  assert all(t.forward[k, r] != t.backward[k, r] for k, r in zip(*np.nonzero(both)))
  # Fewer ticks and a smaller idle share than 1F1B on the same pipeline.
  one = analyse(Schedule("1f1b", 4, 8))
  assert analyse(s).ticks < one.ticks and analyse(s).busy > one.busy


@pytest.mark.parametrize("args,field", [
    (("zb", 4, 8), "pipeline.schedule"), (("1f1b", 1, 8), "mesh.stage"),
    (("dualpipe", 3, 8), "mesh.stage"), (("dualpipe", 4, 6), "pipeline.micro_batches"),
    (("dualpipe", 4, 9), "pipeline.micro_batches"), (("gpipe", 4, 0), "pipeline.micro_batches")])
def test_bad_schedules_name_the_field(args, field):
  with pytest.raises(ValueError, match=f"config.{field}"):
    Schedule(*args)


def test_stage_cuts():
  assert stage_layers(8, 4) == (2, 2, 2, 2)
  assert stage_layers(5, 2, (2, 3)) == (2, 3)
  with pytest.raises(ValueError, match=r"config.mesh.stage: 4 stages do not divide the 6 MoE"
                                       r".*layers_per_stage \(e.g. 1,2,2,1\)"):
    stage_layers(6, 4)
  for bad in ((3, 3), (1, 1, 1, 2), (0, 3, 3, 0)):
    with pytest.raises(ValueError, match="config.pipeline.layers_per_stage"):
      stage_layers(6, 4 if len(bad) == 4 else 3, bad)
  cut = StageCut((1, 3), 2)  # DualPipe: rank 0 holds stages 0 and 1, rank 1 stages 1 and 0
  assert cut.index().tolist() == [[[0, 0, 0], [1, 2, 3]], [[1, 2, 3], [0, 0, 0]]]
  assert cut.mask().tolist() == [[True, False, False], [True, True, True]]
  assert cut.holders().tolist() == [[0, 9], [3, 6], [4, 7], [5, 8]]


def _toy(name, pp, m):
  """Loss and gradients of a toy model (embedding, tanh stages with an aux term, a squared
  head) pipelined vs run sequentially."""
  s = Schedule(name, pp, m)
  rng = np.random.default_rng(0)
  d = 8
  outer = {"emb": jnp.asarray(rng.normal(size=(16, d)), jnp.float32),
           "head": jnp.asarray(rng.normal(size=(d,)), jnp.float32)}
  w = jnp.asarray(rng.normal(size=(pp, d, d)) / 3, jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 16, (m, 4, 3)))

  def first_fn(outer, data):
    return outer["emb"][data["tok"]]

  def stage_fn(w, x, data, stage):
    y = jnp.tanh(x @ w)
    return y, 0.01 * jnp.sum(y ** 2) * (stage + 1), {"s": jnp.sum(y)}

  def last_fn(outer, y, data):
    loss = jnp.sum((y @ outer["head"]) ** 2)
    return loss, {"l": loss}

  def sequential(w, outer):
    total = 0.0
    for i in range(m):
      x = first_fn(outer, {"tok": tokens[i]})
      for k in range(pp):
        x, aux, _ = stage_fn(w[k], x, None, k)
        total += aux
      total += last_fn(outer, x, None)[0]
    return total

  def pipelined(w, outer):
    to_chunks = lambda w: w[:, None] if s.chunks_per_rank == 1 else jnp.stack([w, w[::-1]], 1)
    chunks, back = jax.vjp(to_chunks, w)

    def body(chunks, outer, data):
      res = run_pipeline(s, first_fn, stage_fn, last_fn, chunks[0], outer, data)
      return (jax.lax.psum(res.loss, "stage"), res.stage_grads[None],
              jax.lax.psum(res.outer_grads, "stage"))

    loss, d_chunks, d_outer = jax.shard_map(
        body, in_specs=(P("stage"), P(), P()), out_specs=(P(), P("stage"), P()),
        axis_names={"stage"}, check_vma=False)(chunks, outer, {"tok": tokens})
    return loss, back(d_chunks)[0], d_outer

  want, (dw, douter) = jax.value_and_grad(sequential, argnums=(0, 1))(w, outer)
  with jax.set_mesh(make_mesh(dict(stage=pp, data=-1))):
    got, gw, gouter = jax.jit(pipelined)(w, outer)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(gw, dw, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gouter), jax.tree.leaves(douter)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,pp,m", [("gpipe", 2, 3), ("1f1b", 4, 6), ("dualpipe", 4, 8)])
def test_runtime_equals_sequential_on_a_toy_model(name, pp, m):
  _toy(name, pp, m)


# Dispatch-layout counters depend on which tokens share a shard, which the micro-batch split
# changes; every other metric (and the loss and gradients) must match.
LAYOUT = {"dispatch_per_token", "remote_per_token"}


@pytest.mark.parametrize("mesh,n_layers,runs", [
    (dict(stage=2, expert=2, data=2), 3, (("dualpipe", ()), ("1f1b", ()))),
    (dict(stage=4, data=2), 6, (("gpipe", (1, 2, 1, 1)),)),  # uneven cuts
], ids=["stage2_expert2_data2", "stage4_data2_uneven"])
def test_pipelined_loss_equals_plain_loss(mesh, n_layers, runs):
  cfg = ModelConfig.preset("tiny", n_layers=n_layers)
  mesh = make_mesh(mesh)
  model = create_model(cfg, 0, execution=resolve_execution(cfg, mesh))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(0)
  # 16 rows: each of the 2 x stages pipeline micro-batches still splits over the batch axes
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (16, 17)).astype(np.int32))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": jnp.asarray(rng.random((16, 16)) > 0.1, jnp.float32)}
  stages = mesh.shape["stage"]

  def value_and_grad(loss):
    def f(params):
      return loss(nnx.merge(graphdef, params, rest), batch,
                  normalizers=loss.normalizers(batch, 1), step=jnp.int32(0))
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  with jax.set_mesh(mesh):
    (want, want_m), want_g = value_and_grad(PretrainLoss(cfg.n_mtp_modules))
  flat_want = jax.tree_util.tree_flatten_with_path(want_g)[0]
  for name, cut in runs:
    schedule = Schedule(name, stages, 2 * stages)
    with jax.set_mesh(mesh):
      (got, got_m), got_g = value_and_grad(
          PipelinedPretrainLoss(cfg.n_mtp_modules, schedule, cut))
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    for (path, a), b in zip(flat_want, jax.tree.leaves(got_g)):
      scale = float(jnp.abs(a).max()) + 1e-12
      assert float(jnp.abs(a - b).max()) / scale < 2e-4, (name, jax.tree_util.keystr(path))
    assert set(got_m) == set(want_m)
    for key in set(want_m) - LAYOUT:
      np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {key}")


def _config(**fields):
  from deepseek_jax.train.config import default_config
  c = default_config()
  c.model.preset = "tiny"
  c.model.overrides.vocab_size = 272  # the byte tokenizer's ids
  c.cpu_devices = 8
  c.train.batch_size, c.train.seq_len, c.train.steps = 16, 16, 2
  c.mesh.update(dict(stage=2, fsdp=1, data=-1, expert=2))
  for path, value in fields.items():
    node = c
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("fields,message", [
    (dict(mesh__fsdp=-1, mesh__data=1), "config.mesh.fsdp: is 2; it must be 1 with pipeline"),
    (dict(pipeline__schedule="zb"), "config.pipeline.schedule: must be one of"),
    (dict(mesh__stage=4, mesh__expert=1, pipeline__schedule="gpipe"),
     "config.mesh.stage: 4 stages do not divide the 2 MoE layers"),
    (dict(pipeline__micro_batches=8), "config.pipeline.micro_batches: 8 pipeline micro-batches "
                                      "must divide"),
    (dict(pipeline__layers_per_stage=(1, 2)), "config.pipeline.layers_per_stage"),
    (dict(pipeline__micro_batches=3, pipeline__schedule="dualpipe"),
     "config.pipeline.micro_batches: dualpipe"),
])
def test_trainer_refuses_bad_pipeline_config_before_compiling(fields, message):
  from deepseek_jax.train.trainer import build_setup
  with pytest.raises(ValueError, match=message):
    build_setup(_config(**fields))


def test_trainer_takes_the_pipeline_flags(tmp_path):
  from deepseek_jax.train.trainer import build_setup, pretrain_loss, startup_report, train
  c = _config(pipeline__schedule="dualpipe")
  setup = build_setup(c)
  loss = pretrain_loss(setup)
  assert isinstance(loss, PipelinedPretrainLoss)
  assert (loss.schedule.name, loss.schedule.n_stages, loss.schedule.n_micro) == ("dualpipe", 2, 4)
  report = "\n".join(startup_report(setup))
  assert "pipeline dualpipe over 2 stages, 4 micro-batches" in report and "PP+1" in report
  c.sample.prompts = ()
  result = train(c, str(tmp_path))
  assert np.isfinite(result["eval"]["loss"]) and result["eval"]["loss"] < 1.1 * np.log(272)
  assert (tmp_path / "checkpoints" / "2").is_dir()
