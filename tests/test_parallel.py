"""Sharded training steps on 8 fake CPU devices (fresh processes: XLA_FLAGS must precede jax).

* the dit-stage step on meshes (8,1,1), (2,4,1), (2,2,2) equals the single-device step, and with
  fsdp > 1 the parameters really are split;
* a state saved on one mesh restores onto another;
* two processes x 4 devices (jax.distributed, CPU collectives), one node each — FSDP within a
  process, data parallel across the two (config.train.dcn_mesh) — give the single-process losses;
* a hybrid (DCN x ICI) mesh puts each slice's devices in one block, as jax lays out multislice, and
  its shardings keep FSDP inside a slice.
* train.py's dit stage on two processes x 4 devices, the parameters split across both: a SIGTERM to
  one process stops both at the same step with a checkpoint and exit status 75, the same command
  resumes, and the bundle every process writes its shards of holds exactly the trained weights.
"""

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import FAST_COMPILE, train_command

ROOT = pathlib.Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
mode, out = sys.argv[1], sys.argv[2]
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=" + ("4" if mode == "proc" else "8")
import jax
if mode == "proc":
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2,
                             process_id=int(sys.argv[4]))
import flax
import numpy as np
from zipir_jax import config_lib, parallel
from zipir_jax.training import state as state_lib, steps

config = config_lib.load_config("configs/tiny.py:dit")
config.optim.warmup_steps = 0
config.optim.ema_decay = 0.5
models = state_lib.build_models(config)
rs = np.random.RandomState(0)
L, D = config.text.max_length, config.dit.text_dim
BATCH = {"hq": rs.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32),
         "lq_up": rs.uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32),
         "text_emb": rs.normal(size=(8, L, D)).astype(np.float32),
         "text_mask": (np.arange(L)[None] < rs.randint(1, L, (8, 1))).astype(np.int32)}

RULES = config.train.logical_axis_rules

def run(shape, devices=None, num_steps=3, frozen=None, dcn_shape=(1, 1, 1)):
  mesh = parallel.create_mesh(shape, devices, dcn_shape=dcn_shape)
  # After the reference run, the frozen encoders come in as host arrays, as train.py's dit stage
  # gets them from the earlier stages' export: only the DiT is initialised (a smaller program).
  state, shardings = state_lib.create_train_state(models, mesh, jax.random.PRNGKey(0), frozen or {})
  step = steps.jit_train_step(models, mesh, shardings)
  n, i = jax.process_count(), jax.process_index()
  local = {k: v[i * 8 // n:(i + 1) * 8 // n] for k, v in BATCH.items()}
  if mode == "proc":
    # Compile first, then meet: gloo's connect timeout is short, and on a loaded CPU one process can
    # finish compiling long before the other reaches the first collective.
    from jax._src import distributed
    step.compile(state, parallel.global_batch(local, mesh))  # the executable the steps then run
    distributed.global_state.client.wait_at_barrier("compiled_" + str(shape), 600_000)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, parallel.global_batch(local, mesh))
    losses.append(float(metrics["loss"]))
  return state, shardings, mesh, losses

def host(tree):
  from jax.experimental import multihost_utils
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)

FROZEN = os.path.join(os.path.dirname(out), "frozen.msgpack")
if mode == "mesh":
  ref_state, _, _, ref_losses = run((1, 1, 1), jax.devices()[:1])
  ref = jax.device_get(ref_state)
  with open(FROZEN, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(ref.frozen))
  report = {"ref": ref_losses}
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    state, shardings, mesh, losses = run(shape, frozen=ref.frozen)
    report[str(shape)] = losses
    for name in ("params", "ema_params", "opt_state"):
      for a, b in zip(jax.tree.leaves(jax.device_get(getattr(state, name))),
                      jax.tree.leaves(getattr(ref, name))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
    split = [x for x in jax.tree.leaves(state.params)
             if x.addressable_shards[0].data.shape != x.shape]
    fsdp = [x for x in jax.tree.leaves(state.opt_state)
            if x.ndim and x.addressable_shards[0].data.shape != x.shape]
    report[str(shape) + "_split"] = [len(split), len(fsdp), len(jax.tree.leaves(state.params))]
    if shape == (2, 4, 1):  # restore onto another mesh
      import orbax.checkpoint as ocp
      path = os.path.join(os.path.dirname(out), "ckpt")
      checkpointer = ocp.StandardCheckpointer()
      checkpointer.save(path, state)
      checkpointer.wait_until_finished()
      saved = jax.device_get(state)
  mesh2 = parallel.create_mesh((2, 2, 2))
  abstract = jax.eval_shape(lambda: ref_state)
  sh2 = state_lib.state_shardings(models, mesh2, abstract)
  target = state_lib.abstract_with_shardings(abstract, sh2)
  restored = ocp.StandardCheckpointer().restore(path, target)
  for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [x for x in jax.tree.leaves(restored.params) if x.sharding.mesh.shape == mesh2.shape]
  report["restored_on_222"] = len(moved)
  # the restored state keeps training on the new mesh
  step2 = steps.jit_train_step(models, mesh2, sh2)
  _, m = step2(restored, parallel.global_batch(BATCH, mesh2))
  report["after_restore"] = float(m["loss"])
else:  # "proc": one of two processes ("nodes") with 4 devices each
  with open(FROZEN, "rb") as f:
    frozen = flax.serialization.msgpack_restore(f.read())
  # FSDP over each process's 4 devices, data parallel across the 2 processes: the (2, 4, 1) mesh.
  _, _, mesh, losses = run((1, -1, 1), frozen=frozen, dcn_shape=(2, 1, 1))
  by_data = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
  report = {"losses": losses, "devices": jax.device_count(), "processes": jax.process_count(),
            "shape": list(mesh.devices.shape), "processes_by_data_index": by_data}
if jax.process_index() == 0:
  with open(out, "w") as f:
    json.dump(report, f)
"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  root = tmp_path_factory.mktemp("parallel")
  script = root / "worker.py"
  script.write_text(WORKER)
  # A persistent XLA cache shared by test sessions (keys include the jax version and the program).
  cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
    JAX_COMPILATION_CACHE_DIR=cache,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
  )
  env["XLA_FLAGS"] = FAST_COMPILE  # the workers add their fake device counts
  return root, script, env


def _run(worker, *args, name):
  root, script, env = worker
  out = root / f"{name}.json"
  result = subprocess.run(
    [sys.executable, str(script), args[0], str(out), *args[1:]],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mesh_report(worker):
  return _run(worker, "mesh", name="mesh")


def test_sharded_step_equals_single_device_and_two_processes_match_one(worker, mesh_report):
  # One test, not two sharing the fixture: pytest-xdist's grouping does not work with pytest 9.2
  # (pytest-dev/pytest-xdist#1386), and on two workers the fixture's compiles would run twice.
  check_sharded_step_equals_single_device(mesh_report)
  check_two_processes_match_one(worker, mesh_report)


def check_sharded_step_equals_single_device(mesh_report):
  report = mesh_report
  for shape in ("(8, 1, 1)", "(2, 4, 1)", "(2, 2, 2)"):
    np.testing.assert_allclose(report[shape], report["ref"], rtol=1e-5)
  assert report["(8, 1, 1)_split"][0] == 0  # pure data parallel: every parameter replicated
  for shape in ("(2, 4, 1)", "(2, 2, 2)"):
    split, fsdp_opt, total = report[shape + "_split"]
    assert split > total // 2, (shape, split, total)  # params really split
    assert fsdp_opt > 0  # and so are Adam's moments
  assert report["restored_on_222"] > 0 and np.isfinite(report["after_restore"])


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two(argv_of, env, logs=None):
  """The two processes of one jax.distributed run on this machine (a fresh coordinator port):
  ``argv_of(address, i)`` is process i's command line; output to ``logs[i]``, else to pipes."""
  address = f"localhost:{_free_port()}"
  procs = []
  for i in range(2):
    out = open(logs[i], "w", encoding="utf-8") if logs else subprocess.PIPE
    procs.append(
      subprocess.Popen(
        argv_of(address, i),
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT if logs else subprocess.PIPE,
        text=True,
      )
    )
    if logs:
      out.close()  # the child holds its own descriptor
  return procs


def check_two_processes_match_one(worker, mesh_report):
  root, script, env = worker
  out = root / "proc.json"
  procs = _start_two(
    lambda address, i: [sys.executable, str(script), "proc", str(out), address, str(i)], env
  )
  errors = []
  for p in procs:
    _, err = p.communicate(timeout=600)
    if p.returncode:
      errors.append(err[-3000:])
  assert not errors, errors
  multi = json.loads(out.read_text())
  assert multi["devices"] == 8 and multi["processes"] == 2
  assert multi["shape"] == [2, 4, 1] and multi["processes_by_data_index"] == [[0], [1]]
  np.testing.assert_allclose(multi["losses"], mesh_report["(2, 4, 1)"], rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a device: enough to lay out a pod without one."""

  id: int
  process_index: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


@pytest.mark.parametrize(
  "ici, dcn",
  [((1, 4, 1), (2, 1, 1)), ((2, 2, 1), (1, 2, 1)), ((1, 2, 2), (2, 1, 2)), ((2, 1, 1), (2, 2, 1))],
)
@pytest.mark.parametrize("granule", ["slice_index", "process_index"])
def test_hybrid_grid_matches_jax_multislice_layout(ici, dcn, granule):
  """Slices (TPU) or processes (GPU nodes) as granules: jax's own hybrid layout, device for device."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  from zipir_jax import parallel  # pylint: disable=g-import-not-at-top

  per, groups = int(np.prod(ici)), int(np.prod(dcn))
  # Interleaved ids: grouping must follow the granule attribute, not the order of the list.
  devices = [
    FakeDevice(
      id=i,
      process_index=i % groups if granule == "process_index" else 0,
      slice_index=i % groups if granule == "slice_index" else 0,
    )
    for i in range(per * groups)
  ]
  ours = parallel.hybrid_device_grid(ici, dcn, parallel.device_granules(devices, groups))
  theirs = mesh_utils.create_hybrid_device_mesh(
    ici, dcn, devices, process_is_granule=granule == "process_index"
  )
  assert ours.shape == tuple(i * d for i, d in zip(ici, dcn))
  np.testing.assert_array_equal(
    np.vectorize(lambda d: d.id)(ours), np.vectorize(lambda d: d.id)(theirs)
  )


HYBRID = r"""
import json, os, sys
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from zipir_jax import axis_rules, errors, parallel
RULES = axis_rules.LOGICAL_AXIS_RULES
ids = lambda mesh: np.vectorize(lambda d: d.id)(mesh.devices).tolist()
report = {}
# One process, one slice: the 8 devices split in order into 2 "slices" of 4.
dp_over_dcn = parallel.create_mesh((1, 2, 2), dcn_shape=(2, 1, 1))
fsdp_over_dcn = parallel.create_mesh((2, 2, 1), dcn_shape=(1, 2, 1))
report["dp_over_dcn"] = ids(dp_over_dcn)
report["fsdp_over_dcn"] = ids(fsdp_over_dcn)
report["all_slices"] = dict(parallel.create_mesh((-1, 1, 1), dcn_shape=(-1, 1, 1)).shape)
# Shardings on the hybrid mesh: which devices hold which rows of a batch / a (embed, mlp) kernel.
mesh = dp_over_dcn
batch = parallel.global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)["x"]
report["batch_rows"] = {str(s.device.id): sorted({int(v) // 2 for v in np.asarray(s.data).ravel()})
                        for s in batch.addressable_shards}
boxed = {"kernel": nn.Partitioned(jax.ShapeDtypeStruct((8, 8), jnp.float32), ("embed", "mlp"))}
sharding = parallel.logical_shardings(boxed, mesh, RULES)["kernel"]
report["kernel_spec"] = [a if a is None or isinstance(a, str) else list(a) for a in sharding.spec]
kernel = jax.device_put(np.arange(64.0).reshape(8, 8), sharding)
report["kernel_blocks"] = {str(s.device.id): [s.index[0].start or 0, s.index[1].start or 0]
                           for s in kernel.addressable_shards}
# Under use_mesh the models' logical constraints take effect (under `with mesh:` they did not).
def f(x):
  return nn.with_logical_constraint(x * 2, ("batch", "activation_mlp"))
with parallel.use_mesh(mesh, RULES):
  y = jax.jit(f)(jnp.ones((8, 4)))
report["constrained"] = [a if a is None or isinstance(a, str) else list(a) for a in y.sharding.spec]
report["value_ok"] = bool(np.all(np.asarray(y) == 2))
# A model with DenseGeneral heads (T5) applies under the mesh and computes what it does without.
from zipir_jax.models import t5
cfg = t5.tiny_byt5_config()
params = t5.init_t5_encoder(cfg, jax.random.key(0))
ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (8, 6)), jnp.int32)
apply = jax.jit(t5.T5Encoder(cfg).apply)
ref = apply({"params": params}, ids)
with parallel.use_mesh(mesh, RULES):
  out = jax.jit(t5.T5Encoder(cfg).apply)({"params": params}, ids)
report["t5_max_diff"] = float(jnp.max(jnp.abs(out - ref)))
errs = {}
for name, call in {
  "ici": lambda: parallel.create_mesh((8, 1, 1), dcn_shape=(2, 1, 1)),
  "dcn": lambda: parallel.create_mesh((1, 1, 1), dcn_shape=(3, 1, 1)),
  "rank": lambda: parallel.create_mesh((1, 1), dcn_shape=(1, 1, 1)),
  "rules": lambda: parallel.axis_rules((("embed", "model"),)),
}.items():
  try:
    call()
    errs[name] = None
  except errors.ConfigError as e:
    errs[name] = str(e)
report["errors"] = errs
with open(sys.argv[1], "w") as f:
  json.dump(report, f)
"""


def test_hybrid_mesh_layout_and_shardings_on_fake_devices(worker):
  root, _, env = worker
  script, out = root / "hybrid.py", root / "hybrid.json"
  script.write_text(HYBRID)
  result = subprocess.run(
    [sys.executable, str(script), str(out)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  # data = 2 slices x 1: slice 0 (devices 0-3) is data row 0, slice 1 is row 1.
  assert report["dp_over_dcn"] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
  # fsdp = 2 slices x 2: fsdp 0-1 inside slice 0, 2-3 inside slice 1.
  assert report["fsdp_over_dcn"] == [[[0], [1], [4], [5]], [[2], [3], [6], [7]]]
  assert report["all_slices"] == {"data": 8, "fsdp": 1, "tensor": 1}  # one process: one slice
  # Batch over (data, fsdp): each slice holds its own half of the global batch.
  rows = {int(d): r for d, r in report["batch_rows"].items()}
  assert all(set(rows[d]) <= set(range(4)) for d in (0, 1, 2, 3))
  assert all(set(rows[d]) <= set(range(4, 8)) for d in (4, 5, 6, 7))
  assert all(len(r) == 2 for r in rows.values())  # 4 batch shards, each on 2 tensor devices
  assert sorted({r for d in rows for r in rows[d]}) == list(range(8))
  # (embed, mlp) over (fsdp, tensor): each slice holds the whole kernel (no gather over DCN).
  assert report["kernel_spec"] == ["fsdp", "tensor"]
  blocks = {int(d): tuple(b) for d, b in report["kernel_blocks"].items()}
  for devices in ((0, 1, 2, 3), (4, 5, 6, 7)):
    assert sorted(blocks[d] for d in devices) == [(0, 0), (0, 4), (4, 0), (4, 4)]
  assert report["constrained"] == [["data", "fsdp"], "tensor"] and report["value_ok"]
  assert report["t5_max_diff"] < 1e-5
  errs = report["errors"]
  assert "config.train.mesh=(8, 1, 1) needs 8 devices per slice/node; this run has 4" in errs["ici"]
  assert "dcn_mesh asks for 3 slices/nodes; 8 devices do not split evenly" in errs["dcn"]
  assert "config.train.mesh must be 3 integers" in errs["rank"]
  assert "rule 'embed' maps to ['model']; mesh axes are data, fsdp, tensor" in errs["rules"]


def test_two_processes_stop_together_at_sigterm_resume_and_export_one_bundle(worker, tmp_path):
  """train.py's dit stage from the command line on 2 processes x 4 CPU devices, FSDP over all 8
  (the DiT's matrices and most encoder kernels are split across both processes). A SIGTERM to
  process 1 while the run sets up is a preemption notice: both processes take step 1, checkpoint it
  and exit 75, without exporting. The same command resumes from it and exports: each process writes its shards
  of the bundle, which loads in this 1-device process with exactly the checkpoint's weights and
  restores the same image as those weights do in one process."""
  import jax

  from zipir_jax import bundle as bundle_lib
  from zipir_jax import config_lib, param_io, restore
  from zipir_jax.data import testing
  from zipir_jax.training import export, stages

  # Each process compiles the step (on CPU, jax's persistent cache key differs between the
  # processes of a run, and only process 0 writes).
  env = dict(worker[2], XLA_FLAGS=f"{FAST_COMPILE} --xla_force_host_platform_device_count=4")
  data, workdir = tmp_path / "data", tmp_path / "work"
  testing.write_image_folder(str(data), [(80, 80), (96, 128), (72, 100), (128, 96), (100, 100)])
  config = config_lib.load_config("configs/tiny.py:dit")
  prerequisite = export.random_prerequisite(config, str(workdir), jax.random.key(0))

  def argv_of(address, i):
    return train_command(
      data,
      "dit",
      workdir,
      "--config.data.buckets=((64,64,8),)",
      "--config.train.mesh=(1,8,1)",
      f"--coordinator={address}",
      "--num_processes=2",
      f"--process_id={i}",
      num_steps=1,
    )

  logs = [tmp_path / f"preempted{i}.log" for i in range(2)]
  procs = _start_two(argv_of, env, logs)
  try:
    deadline = time.monotonic() + 300
    while "stage dit, mesh" not in logs[1].read_text():  # jax.distributed is up; setup begins
      assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
      assert time.monotonic() < deadline, "process 1 did not start in 300 s"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = [log.read_text() for log in logs]
  assert codes == [75, 75], [out[-3000:] for out in outputs]
  assert all("preempted: checkpoint of step 1 written" in out for out in outputs)
  checkpoints = workdir / "dit" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1"]  # complete, no tmp folder
  assert not (workdir / "dit" / "bundle").exists()

  logs = [tmp_path / f"resumed{i}.log" for i in range(2)]
  procs = _start_two(argv_of, env, logs)
  codes = [p.wait(timeout=600) for p in procs]
  outputs = [log.read_text() for log in logs]
  assert codes == [0, 0], [out[-3000:] for out in outputs]
  assert all("resumed dit from step 1 " in out for out in outputs)

  loaded = bundle_lib.load_bundle(str(workdir / "dit" / "bundle"))  # 1 device here, not 8
  final = param_io.restore(str(checkpoints / "1" / "state"))
  decoder = param_io.restore(os.path.join(prerequisite, "params"))["pixel_decoder"]
  trained = {
    "vae": {k: final["frozen"][k] for k in stages.experiment(config.vae.kind).encoders},
    "pixel_decoder": decoder,
    "dit": final["ema_params"]["dit"],
    "latent_stats": final["frozen"]["latent_stats"],
  }
  jax.tree.map(np.testing.assert_array_equal, loaded.params, trained)
  reference = bundle_lib.Bundle(
    loaded.config, trained, loaded.text_config, loaded.text_params, loaded.tokenizer
  )
  lq = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  images = [restore.Restorer(b).restore([lq], (64, 64), ["a cat"]) for b in (loaded, reference)]
  np.testing.assert_array_equal(*images)
