"""The servers a benchmark talks to (emulator API + media host, S3), each in a child process.

`BenchStack` starts them and reconfigures the emulator per benchmark over its control routes. It
clears this process's RIVYA_*/AWS_*/DAGSTER_* environment and sets dummy AWS credentials: nothing
can reach a real API, bucket, ledger or Dagster instance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx

from ..emulator import ApiKeyConfig, EmulatorConfig
from ..rivya import RivyaClient
from ..storage import make_s3_client

# Not a secret: the key the benchmark's own emulator accepts.
BENCH_API_KEY = "rvya_sk_bench_emulator_key"
BENCH_BUCKET = "rivya-bench"
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
ENOUGH_CREDITS = 100_000_000


class ServerProcess:
    """A `bench.servers` child: its URLs are the first line it prints; closing its stdin stops it."""

    def __init__(self, kind: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "rivya_pipeline.bench.servers", kind],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self._process.stdout.readline() if self._process.stdout else ""
        if not line.strip():
            self.close()
            raise RuntimeError(f"the benchmark's {kind} server did not start")
        self.urls = line.split()

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        if self._process.stdin:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class BenchStack:
    def __enter__(self) -> BenchStack:
        # Nothing of the caller's setup may leak in (a real ledger URL, bucket, key or AWS profile): this process
        # and every child it starts see the benchmark's own settings only.
        for name in [n for n in os.environ if n.startswith(("RIVYA_", "AWS_", "DAGSTER_"))]:
            del os.environ[name]
        os.environ.update(DUMMY_AWS)
        self._servers = [ServerProcess("emulator")]
        self._servers.append(ServerProcess("s3"))
        (self.api_url, self.media_url), (self.s3_url,) = self._servers[0].urls, self._servers[1].urls
        self._control = httpx.Client(base_url=self.api_url + "/_emulator", timeout=60)
        self.s3 = make_s3_client(endpoint_url=self.s3_url, region="us-east-1")
        self.s3.create_bucket(Bucket=BENCH_BUCKET)
        return self

    def __exit__(self, *exc: object) -> None:
        self._control.close()
        for server in self._servers:
            server.close()

    def configure(self, **config: Any) -> EmulatorConfig:
        """Reset the emulator (no tasks, full wallet, no stats) with these EmulatorConfig fields."""
        values = {"api_keys": [ApiKeyConfig(key=BENCH_API_KEY)], "initial_credits": ENOUGH_CREDITS} | config
        emulator_config = EmulatorConfig(**values)
        self._control.post("/reset", content=emulator_config.model_dump_json()).raise_for_status()
        return emulator_config

    def stats(self) -> dict[str, Any]:
        response = self._control.get("/stats")
        response.raise_for_status()
        return response.json()

    def pipeline_env(self) -> dict[str, str]:
        """The environment of a pipeline process (the CLI, a daemon, a worker) on this stack's emulator and bucket."""
        return dict(os.environ) | {
            "RIVYA_API_KEY": BENCH_API_KEY,
            "RIVYA_BASE_URL": self.api_url,
            "RIVYA_ALLOW_LOCAL_MEDIA": "1",
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "RIVYA_S3_BUCKET": BENCH_BUCKET,
        }

    def client(self, **options: Any) -> RivyaClient:
        return RivyaClient(BENCH_API_KEY, self.api_url, **options)

    def empty_bucket(self) -> None:
        """moto holds objects in memory: drop them between benchmarks (a 1 GiB video costs 1 GiB there)."""
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=BENCH_BUCKET):
            for item in page.get("Contents", []):
                self.s3.delete_object(Bucket=BENCH_BUCKET, Key=item["Key"])
