r"""Steps/s of train.py's whole training loop (data, host work, step, reporting), side by side.

  python bench/train_loop.py --repeats=5                                     # this tree
  python bench/train_loop.py --tree=before:/tmp/zipir_before --tree=after:.  # two trees, one run

Each run is ``python train.py --config=configs/tiny.py:dit`` in a tree, with a fresh workdir, the
same image folder and the same random prerequisite export (``export.random_prerequisite``): the
tiny dit stage, 64x64 x 4, T5 on every batch. Steps/s is the run's own report in
``metrics.jsonl`` over the intervals after the first (which holds compilation). The trees' runs
alternate so that a change in the machine's load falls on both; medians over repeats. A tree is
any checkout of this repository (``git archive <commit> | tar -x -C DIR`` makes one of a commit);
its own ``zipir_jax`` is what runs. Paste the table into BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def prepare(folder: str) -> tuple[str, str]:
  """(image folder, workdir holding the dit stage's random prerequisite export), made once."""
  import jax  # pylint: disable=g-import-not-at-top

  from zipir_jax import config_lib  # pylint: disable=g-import-not-at-top
  from zipir_jax.data import testing  # pylint: disable=g-import-not-at-top
  from zipir_jax.training import export  # pylint: disable=g-import-not-at-top

  data, workdir = os.path.join(folder, "data"), os.path.join(folder, "prerequisite")
  testing.write_image_folder(data, [(80, 80), (96, 128), (72, 100), (128, 96), (100, 100)])
  config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py:dit"))
  export.random_prerequisite(config, workdir, jax.random.key(0))
  return data, workdir


def run_once(tree: str, data: str, prerequisite: str, workdir: str, args) -> list[float]:
  """steps/s of each reported interval after the first, for one train.py run in ``tree``."""
  shutil.copytree(prerequisite, workdir)
  command = [
    sys.executable,
    "train.py",
    "--config=configs/tiny.py:dit",
    f"--workdir={workdir}",
    f"--config.data.path={data}",
    "--config.data.buckets=((64,64,4),)",
    f"--config.optim.num_steps={args.num_steps}",
    f"--config.train.log_every={args.log_every}",
    "--config.train.image_every=0",
    "--config.train.checkpoint_every=100000",
  ]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), PYTHONPATH=tree)
  result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    raise SystemExit(f"{tree}: train.py failed:\n{result.stderr[-3000:]}")
  with open(os.path.join(workdir, "dit", "metrics.jsonl"), encoding="utf-8") as f:
    rates = [json.loads(line)["steps_per_sec"] for line in f]
  return rates[1:]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tree", action="append", default=[], help="NAME:PATH (repeatable)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num_steps", type=int, default=60)
  parser.add_argument("--log_every", type=int, default=20)
  args = parser.parse_args()
  trees = [t.partition(":")[::2] for t in args.tree] or [("this", ROOT)]
  folder = tempfile.mkdtemp(prefix="train_loop_")
  try:
    data, prerequisite = prepare(folder)
    rates = {name: [] for name, _ in trees}
    for r in range(args.repeats):
      for name, tree in trees:
        workdir = os.path.join(folder, f"{name}_{r}")
        measured = run_once(os.path.abspath(tree), data, prerequisite, workdir, args)
        rates[name].append(statistics.mean(measured))
        print(json.dumps({"tree": name, "repeat": r, "steps_per_sec": measured}), flush=True)
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  print(
    f"\n# bench/train_loop.py — {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, "
    f"{os.cpu_count()} logical cores, load average {load:.2f} at the end; tiny dit, 64x64 x 4, "
    f"{args.num_steps} steps, steps/s over steps {args.log_every + 1}..{args.num_steps}\n"
  )
  print("| tree | median steps/s | runs (mean steps/s each) |")
  print("|---|---|---|")
  for name, _ in trees:
    runs = ", ".join(f"{v:.2f}" for v in rates[name])
    print(f"| {name} | {statistics.median(rates[name]):.2f} | {runs} |")


if __name__ == "__main__":
  main()
