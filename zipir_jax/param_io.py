"""Parameter trees on disk (Orbax): written by every process as they lie, read back as numpy anywhere.

A sharded ``jax.Array`` is written by the processes that hold its shards: no process gathers the
whole model to its host (a pod host has not the memory for it, and Orbax's saves meet at
cross-process barriers that a save by process 0 alone never reaches). Numpy leaves, identical on
every process, are written once. Reading builds numpy arrays from the checkpoint's own metadata, so
an export or bundle written by a mesh of many hosts loads on one CPU, whatever devices it has.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import numpy as np

_BARRIERS = itertools.count()


def save(path: str, tree: Any) -> None:
  """Writes ``tree`` (jax.Arrays, sharded or not, and numpy arrays) to the folder ``path``,
  replacing what is there. Every process calls it with the same tree; it returns when the
  checkpoint is complete on disk."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), tree, force=True)
  checkpointer.wait_until_finished()


def restore(path: str) -> Any:
  """The tree saved at ``path`` as numpy arrays, on any machine (whatever mesh wrote it)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Returns once every process has called it with the same ``name`` (a no-op on one process).

  Through the coordination service, not a device collective: a process that arrives minutes after
  the others (still compiling, still writing a file) does not time out a collective's short wait.
  Every process must reach the same barriers in the same order.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # pylint: disable=g-import-not-at-top

  multihost.get_barrier_sync_fn()(
    key=f"zipir:{name}:{next(_BARRIERS)}", timeout_ms=timeout_s * 1000
  )
