"""The package's import graph: no cycles (counting imports inside functions), and the layers below
the configs (models/, data/, diffusion, parallel) never reach up into config_lib."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "zipir_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports anywhere in its source (functions included)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if isinstance(node, ast.Import):
        targets |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from zipir_jax.models import dit` imports the module zipir_jax.models.dit; a name that is
        # no module (`from zipir_jax.models import count_params`) comes from the package itself.
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          targets.add(sub if sub in modules else node.module)
    graph[name] = {t for t in targets if t in modules and t != name}
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return [*stack[stack.index(nxt) :], nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_no_import_cycle():
  graph = import_graph()
  assert graph.get("zipir_jax.training.loop")
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_detector_finds_a_planted_cycle():
  graph = import_graph()
  graph["zipir_jax.errors"] = {"zipir_jax.training.loop"}  # errors <- ... <- loop
  assert _cycle(graph) is not None


def test_lower_layers_do_not_import_config_lib():
  """Models, data, diffusion and parallel raise errors.ConfigError; only programs load configs
  (models/summary.py is the command line that prints a config's parameter counts)."""
  lower = ("zipir_jax.models.", "zipir_jax.data.", "zipir_jax.diffusion", "zipir_jax.parallel")
  offenders = [
    name
    for name, targets in import_graph().items()
    if name.startswith(lower)
    and name != "zipir_jax.models.summary"
    and "zipir_jax.config_lib" in targets
  ]
  assert not offenders
  assert import_graph()["zipir_jax.errors"] == set()  # the leaf every layer may import
