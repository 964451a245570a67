"""Every command line of the README, run in a subprocess as written: a README command that errors fails here.

Which lines: the first code span of each cell in a table column headed "command" (the rest of such a cell is
prose, e.g. "(reads `workspace.yaml`)"), and every line of a fenced code block in a shell language (bash, sh,
shell, console). Code in running text is a mention, not a command line. The lines are read from the README on
every run, so a command added there is tested with no change here.

How each line is run, and why:

- From the repository root, with the environment pointed at this test's stack: the session's emulator and S3
  server over HTTP, a temporary DAGSTER_HOME, a temporary copy of the sample briefs as RIVYA_REQUESTS_PATH.
  Nothing reaches a real API, bucket or instance, and no command writes into the repository.
- Synopsis syntax: a line with `[optional]` parts runs twice, with none of them and with all of them; the
  placeholders PATH (the copy of the sample briefs) and S (seconds) are filled in, and any other placeholder
  fails the test until it is given a value here.
- Port options get free ports (a developer's stack on the default ports stays undisturbed), and options that
  name a data folder get a temporary one; a command that would otherwise use a fixed port or the repository's
  folder (`demo`, `dev`) has them added.
- Servers (`rivya-pipeline emulator`, `rivya-pipeline dev`, `dagster dev`) run until they answer HTTP: the
  emulator on its API and media hosts, the Dagster UI with the `rivya_pipeline` code location loaded. They must
  still be running then; they are stopped like Ctrl-C, and their whole process group is killed if it lingers.
- `make TARGET`: `make -n TARGET` must succeed (the target exists and its recipe expands; `-n` executes
  nothing), then every `rivya-pipeline` line of the recipe is run by these same rules. The recipe's other lines
  are the build's own and are not run here: `make test`'s linters and pytest are exactly what CI runs (pytest
  inside pytest would recurse), and setup lines install packages.
- `rivya-pipeline bench ...` runs with `--help` appended: the benchmarks take minutes, and `test_bench.py`
  already runs `bench all --json --quick` end to end. argparse still checks every argument before `--help`.
- `rivya-pipeline demo` runs for real: the sample briefs end to end on its own embedded stack.
- Every other line must exit 0 within a timeout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rivya_pipeline.settings import REPO_ROOT
from rivya_pipeline_tests.fixtures_emulator import TEST_API_KEY
from rivya_pipeline_tests.fixtures_pipeline import FAST_LIFECYCLE
from rivya_pipeline_tests.helpers import free_ports

pytestmark = pytest.mark.slow

README = REPO_ROOT / "README.md"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"[A-Z]+")
COMMAND_TIMEOUT_SECONDS = 300
SERVER_START_TIMEOUT_SECONDS = 240  # `dagster dev` loads the code location in a process of its own
STOP_GRACE_SECONDS = 30
NEVER = "0 0 1 1 *"  # brief_discovery must not launch runs of its own while a UI is up
CODE_LOCATION = "rivya_pipeline"
WORKSPACE_QUERY = (
    "{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus"
    " locationOrLoadError { __typename ... on PythonError { message } } } } } }"
)


# -- reading the README ------------------------------------------------------------------------------------------


def table_commands(text: str) -> list[str]:
    """The first code span of every cell under a "command" header, in every table."""
    commands: list[str] = []
    column: int | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:  # a header row
            column = next((i for i, cell in enumerate(cells) if cell.lower() == "command"), -1)
        elif column >= 0 and column < len(cells) and not set(cells[column]) <= set("-: "):
            span = re.search(r"`([^`]+)`", cells[column])
            if span:
                commands.append(span.group(1))
    return commands


def code_block_commands(text: str) -> list[str]:
    """Every line of the fenced blocks in a shell language, without comments, prompts and blank lines."""
    commands: list[str] = []
    language: str | None = None
    for line in text.splitlines():
        fence = re.match(r"\s*```\s*(\S*)", line)
        if fence:
            language = fence.group(1).lower() if language is None else None
            continue
        if language in SHELL_LANGUAGES:
            command = " ".join(shlex.split(line.removeprefix("$ "), comments=True))
            if command:
                commands.append(command)
    return commands


def readme_commands() -> list[str]:
    text = README.read_text(encoding="utf-8")
    return list(dict.fromkeys(table_commands(text) + code_block_commands(text)))


def written_forms(command: str) -> list[str]:
    """The line without its `[optional]` parts and with all of them (one form when it has none)."""
    optional = re.compile(r"(?<!\S)\[([^\[\]]*)\](?!\S)")
    forms = [optional.sub("", command), optional.sub(r"\1", command)]
    return list(dict.fromkeys(" ".join(form.split()) for form in forms))


# -- the stack every command runs against ------------------------------------------------------------------------


@dataclass
class ReadmeStack:
    env: dict[str, str]
    tmp: Path
    placeholders: dict[str, str]

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        return path


@pytest.fixture
def readme_stack(tmp_path, configure_emulator, s3_bucket, s3_endpoint_url) -> ReadmeStack:
    emulator = configure_emulator(**FAST_LIFECYCLE)
    briefs = tmp_path / "requests"
    shutil.copytree(REPO_ROOT / "requests", briefs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RIVYA_", "DAGSTER_"))}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "RIVYA_API_KEY": TEST_API_KEY,
        "RIVYA_BASE_URL": emulator.base_url,
        "RIVYA_ALLOW_LOCAL_MEDIA": "1",
        "RIVYA_S3_BUCKET": s3_bucket[1],
        "AWS_ENDPOINT_URL_S3": s3_endpoint_url,
        "RIVYA_REQUESTS_PATH": str(briefs),
        "RIVYA_DISCOVERY_CRON": NEVER,
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
    }
    (tmp_path / "dagster_home").mkdir()
    return ReadmeStack(env=env, tmp=tmp_path, placeholders={"PATH": str(briefs), "S": str(COMMAND_TIMEOUT_SECONDS)})


# -- processes -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def started(argv: list[str], stack: ReadmeStack) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The command in a session of its own (so its whole process group can be stopped), output to a log file."""
    log = stack.tmp / f"{Path(argv[0]).name}-{time.monotonic_ns()}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=stack.env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, log
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """Ctrl-C to the process group, then SIGKILL to whatever of it is left."""
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_SECONDS)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def described(argv: list[str]) -> str:
    return shlex.join(argv)


# -- what "works" means for each kind of command ---------------------------------------------------------------------


def emulator_serves(ports: dict[str, int]) -> bool:
    """The API host lists the models (a public route) and the media host answers for an unknown video."""
    try:
        models = httpx.get(f"http://127.0.0.1:{ports['--port']}/api/v1/models", timeout=5)
        media = httpx.get(f"http://127.0.0.1:{ports['--media-port']}/media/task_unknown.mp4", timeout=5)
    except httpx.HTTPError:
        return False
    assert models.status_code == 200 and "kling-3-0" in {m["id"] for m in models.json()["data"]}
    assert media.status_code == 404
    return True


def dagster_ui_serves(ports: dict[str, int]) -> bool:
    """The UI answers GraphQL and has loaded the `rivya_pipeline` code location, without an error."""
    try:
        answer = httpx.post(
            f"http://127.0.0.1:{ports['--port']}/graphql", json={"query": WORKSPACE_QUERY}, timeout=10
        ).json()
    except (httpx.HTTPError, ValueError):
        return False
    entries = {entry["name"]: entry for entry in answer["data"]["workspaceOrError"].get("locationEntries", [])}
    entry = entries.get(CODE_LOCATION)
    if entry is None or entry["loadStatus"] != "LOADED":
        return False
    loaded = entry["locationOrLoadError"]
    assert loaded["__typename"] == "RepositoryLocation", loaded.get("message")
    return True


@dataclass(frozen=True)
class Adaptation:
    """How one kind of command is run here (see the module docstring)."""

    ports: tuple[str, ...] = ()  # options that get a free port, replacing the README's value or added
    folders: tuple[str, ...] = ()  # options that get a temporary folder
    serves: Callable[[dict[str, int]], bool] | None = None  # a server: True once it answers on its ports
    help_only: bool = False

    def apply(self, argv: list[str], stack: ReadmeStack) -> tuple[list[str], dict[str, int]]:
        ports = dict(zip(self.ports, free_ports(len(self.ports)), strict=True))
        values = {option: str(port) for option, port in ports.items()}
        values |= {option: str(stack.folder(option.strip("-"))) for option in self.folders}
        for option, value in values.items():
            argv = with_option(argv, option, value)
        return [*argv, "--help"] if self.help_only else argv, ports


ADAPTATIONS = {
    ("rivya-pipeline", "emulator"): Adaptation(ports=("--port", "--media-port"), serves=emulator_serves),
    ("rivya-pipeline", "dev"): Adaptation(
        ports=("--port", "--api-port", "--media-port", "--s3-port"), folders=("--data-dir",), serves=dagster_ui_serves
    ),
    ("rivya-pipeline", "demo"): Adaptation(ports=("--api-port", "--media-port", "--s3-port"), folders=("--data-dir",)),
    ("rivya-pipeline", "bench"): Adaptation(help_only=True),
    ("dagster", "dev"): Adaptation(ports=("--port",), serves=dagster_ui_serves),
}


def with_option(argv: list[str], option: str, value: str) -> list[str]:
    """`argv` with `option` set to `value`: its value replaced where the line gives one, else the option added."""
    out: list[str] = []
    index, found = 0, False
    while index < len(argv):
        word = argv[index]
        if word == option and index + 1 < len(argv):
            out += [option, value]
            index, found = index + 2, True
            continue
        if word.startswith(f"{option}="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(word)
        index += 1
    return out if found else [*out, option, value]


def kind_of_command(argv: list[str]) -> tuple[str, str]:
    """(program, first word after it that is not an option): ("make", "demo"), ("rivya-pipeline", "run"), ..."""
    words = [word for word in argv[1:] if not word.startswith("-")]
    return Path(argv[0]).name, words[0] if words else ""


def filled_in(command: str, stack: ReadmeStack) -> list[str]:
    argv = shlex.split(command)
    unknown = sorted({word for word in argv if PLACEHOLDER.fullmatch(word)} - set(stack.placeholders))
    assert not unknown, f"{command!r}: give the placeholders {unknown} a value in this test"
    return [stack.placeholders.get(word, word) for word in argv]


def check_command(argv: list[str], stack: ReadmeStack) -> None:
    program, subcommand = kind_of_command(argv)
    if program == "make":
        check_make_target(argv, stack)
        return
    adaptation = ADAPTATIONS.get((program, subcommand), Adaptation())
    argv, ports = adaptation.apply(argv, stack)
    if adaptation.serves is None:
        check_finishes(argv, stack)
    else:
        check_serves(argv, ports, adaptation.serves, stack)


def check_finishes(argv: list[str], stack: ReadmeStack) -> None:
    with started(argv, stack) as (process, log):
        try:
            code = process.wait(timeout=COMMAND_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{described(argv)}` still runs after {COMMAND_TIMEOUT_SECONDS} s:\n{tail(log)}")
        assert code == 0, f"`{described(argv)}` exited {code}:\n{tail(log)}"


def check_serves(
    argv: list[str], ports: dict[str, int], serves: Callable[[dict[str, int]], bool], stack: ReadmeStack
) -> None:
    with started(argv, stack) as (process, log):
        deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
        while not serves(ports):
            if process.poll() is not None:
                pytest.fail(f"`{described(argv)}` exited {process.returncode} before serving:\n{tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"`{described(argv)}` did not serve within {SERVER_START_TIMEOUT_SECONDS} s:\n{tail(log)}")
            time.sleep(0.5)
        assert process.poll() is None, f"`{described(argv)}` stopped right after serving:\n{tail(log)}"


def check_make_target(argv: list[str], stack: ReadmeStack) -> None:
    dry_run = subprocess.run(
        ["make", "-n", *argv[1:]], cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=60, check=False
    )
    assert dry_run.returncode == 0 and dry_run.stdout.strip(), f"`make -n {shlex.join(argv[1:])}`:\n{dry_run.stderr}"
    for line in dry_run.stdout.splitlines():
        words = line.split()
        if words and Path(words[0]).name == "rivya-pipeline":
            check_command(shlex.split(line), stack)


# -- the tests -------------------------------------------------------------------------------------------------------


def test_the_readme_has_commands_in_its_tables_and_its_code_blocks() -> None:
    """The reading finds both kinds of lines, each one starting with a program that exists, and no YAML."""
    text = README.read_text(encoding="utf-8")
    tables, blocks = table_commands(text), code_block_commands(text)
    assert tables and blocks
    search_path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    for command in tables + blocks:
        program = shlex.split(command)[0]
        assert (REPO_ROOT / program).is_file() or shutil.which(program, path=search_path), command
    assert not [line for line in blocks if line.startswith(("id:", "prompt:", "params:"))]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_works_as_written(command: str, readme_stack: ReadmeStack) -> None:
    for form in written_forms(command):
        check_command(filled_in(form, readme_stack), readme_stack)
