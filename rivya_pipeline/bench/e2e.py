"""`bench e2e`: 100 briefs with instant generation through `rivya-pipeline run`, against a bare script.

Both sides are the command a user would run, each in a process of its own (startup and imports count on
both sides): `rivya-pipeline run --requests DIR --json` (HeadlessRun: Dagster runs on a fresh SQLite
instance, the ledger, the poller, checks and sidecars) and `bench.bare_e2e` (httpx + boto3, the same
API and S3 calls, nothing else). Every brief has one reference image, so both upload, create, poll,
download and store once per brief. The emulator finishes tasks at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dagster import DagsterInstance

from ..briefs import load_briefs
from ..settings import REPO_ROOT
from .common import BenchResult
from .dagster_floor import INSTANCE_YAML
from .stack import BENCH_API_KEY, BENCH_BUCKET, BenchStack

FULL_BRIEFS = 100
QUICK_BRIEFS = 2
REFERENCE = REPO_ROOT / "requests" / "images" / "product.png"
RATIO_GOAL = 3.0


def write_briefs(folder: Path, count: int) -> None:
    """`count` one-reference briefs, one file each (the usual layout of a briefs folder)."""
    shutil.copy(REFERENCE, folder / REFERENCE.name)
    for index in range(count):
        (folder / f"brief-{index:03d}.yaml").write_text(
            f"id: brief-{index:03d}\n"
            f"prompt: Shot {index} of the bottle in the reference turning on a grey sweep.\n"
            "params: {duration: 3, aspect_ratio: '1:1'}\n"
            f"references: [{REFERENCE.name}]\n",
            encoding="utf-8",
        )


def timed_command(command: list[str], *, env: dict[str, str], stdin: str = "") -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, input=stdin, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def run_bare_script(stack: BenchStack, folder: Path, env: dict[str, str]) -> tuple[float, int]:
    """`bench.bare_e2e` over the briefs of `folder` in a process of its own: (seconds, videos stored)."""
    job = {
        "api_url": stack.api_url,
        "api_key": BENCH_API_KEY,
        "s3_url": stack.s3_url,
        "bucket": BENCH_BUCKET,
        "briefs": [
            {
                "id": brief.id,
                "key": f"bare-{brief.request.idempotency_key()}",
                "model": brief.model,
                "prompt": brief.prompt,
                "params": brief.request.params,
                "references": [
                    {"path": str(ref.path), "name": ref.name, "mime_type": ref.mime_type}
                    for ref in brief.request.references
                ],
            }
            for brief in load_briefs(folder)
        ],
    }
    seconds, output = timed_command(
        [sys.executable, "-m", "rivya_pipeline.bench.bare_e2e"], env=env, stdin=json.dumps(job)
    )
    return seconds, json.loads(output)["stored"]


def run(stack: BenchStack, quick: bool) -> BenchResult:
    count = QUICK_BRIEFS if quick else FULL_BRIEFS
    stack.configure(queued_seconds=0, processing_seconds=0)
    with tempfile.TemporaryDirectory(prefix="rivya-bench-e2e-") as tmp:
        folder, home = Path(tmp) / "briefs", Path(tmp) / "dagster_home"
        folder.mkdir()
        home.mkdir()
        (home / "dagster.yaml").write_text(INSTANCE_YAML)
        write_briefs(folder, count)
        env = stack.pipeline_env() | {"DAGSTER_HOME": str(home)}
        command = [sys.executable, "-m", "rivya_pipeline.cli", "run", "--requests", str(folder), "--json"]
        pipeline_seconds, output = timed_command(command, env=env)
        stored = sum(1 for outcome in json.loads(output).values() if outcome["status"] == "stored")
        with DagsterInstance.from_config(str(home)) as instance:
            runs = instance.get_runs_count()
        floor_seconds, _ = timed_command(
            [sys.executable, "-m", "rivya_pipeline.bench.dagster_floor", str(runs)], env=env
        )

        bare_seconds, bare_stored = run_bare_script(stack, folder, env)
    stack.empty_bucket()
    ratio = pipeline_seconds / bare_seconds
    floor_ratio = floor_seconds / bare_seconds
    return BenchResult(
        name="e2e",
        setup=f"{count} one-reference briefs, instant generation, `rivya-pipeline run` vs a bare httpx + boto3 script",
        figures={
            "pipeline_seconds": round(pipeline_seconds, 2),
            "bare_seconds": round(bare_seconds, 2),
            "ratio": round(ratio, 2),
            "dagster_runs": runs,
            "dagster_floor_seconds": round(floor_seconds, 2),
            "floor_ratio": round(floor_ratio, 2),
            "briefs": count,
            "pipeline_stored": stored,
            "bare_stored": bare_stored,
        },
        goals=[
            (f"every brief stored by both ({stored} and {bare_stored} of {count})", stored == bare_stored == count),
            (f"pipeline <= {RATIO_GOAL:.0f}x the bare script ({ratio:.1f}x)", ratio <= RATIO_GOAL),
        ],
        bounds=f"Dagster: {runs} runs (a submit and a store per brief, each its own run so that one brief's refusal "
        f"or failure is its own); {runs} runs of an asset that does nothing already take {floor_seconds:.1f} s "
        f"in this run, {floor_ratio:.1f}x the bare script",
    )
