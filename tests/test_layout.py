"""The project's shape: no import cycle among its modules (function-level imports included), short library files,
no sys.path edits, commands that import only the library."""
import ast
from pathlib import Path

from helpers import ROOT

COMMANDS = ("main.py", "process_weights.py", "export_quant_weight.py", "generate_compress_weight.py", "web_demo.py",
            "openai_api.py", "demo_checkpoint.py")
MAX_LIBRARY_LINES = 450


def project_files() -> dict[str, Path]:
    """Module name -> file, for the commands, the seed's modeling file, the package, the benchmarks and the tests."""
    files = {path.stem: path for path in ROOT.glob("*.py")}
    for folder in ("chatglm2", "benchmarks"):
        files.update({f"{folder}.{path.stem}": path for path in (ROOT / folder).glob("*.py") if path.stem != "__init__"})
        files[folder] = ROOT / folder / "__init__.py"
    files.update({path.stem: path for path in (ROOT / "tests").glob("*.py")})
    return {name: path for name, path in files.items() if path.is_file()}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in it, importlib.import_module("...") included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args and \
                isinstance(node.args[0], ast.Constant):
            names = [node.args[0].value]
        found |= {name for name in names if name in known}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(module: str) -> list[str] | None:
        if module in visiting:
            return visiting[visiting.index(module):] + [module]
        if module in done:
            return None
        visiting.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    files = project_files()
    graph = {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}
    assert "chatglm2.model" in graph["chatglm2.quant_export"]  # the walk sees the project's own imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_commands_import_only_the_library():
    files = project_files()
    for command in COMMANDS:
        if (ROOT / command).is_file():
            imports = imported_modules(ROOT / command, set(files))
            assert all(name.startswith("chatglm2") for name in imports), (command, imports)


def uses_sys_path(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))


def test_library_files_are_short_and_nothing_edits_sys_path():
    for path in (ROOT / "chatglm2").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LIBRARY_LINES, path.name
    assert not [path for path in project_files().values() if uses_sys_path(path)]


def test_the_readme_test_command_is_what_ci_runs():
    """The README's one test command installs what is missing itself (tests/run.sh), and CI runs exactly it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = readme.split("## Tests (one command)", 1)[1].split("```shell\n", 1)[1].split("\n", 1)[0]
    assert command == "bash tests/run.sh"
    assert (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1] == command
    script = (ROOT / "tests" / "run.sh").read_text(encoding="utf-8")
    assert "pip_install -r requirements.txt -r requirements-dev.txt" in script and "apt-get install" in script
    assert script.strip().splitlines()[-1] == 'exec "$PYTHON" -m pytest -q tests "$@"'
