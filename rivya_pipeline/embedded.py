"""The embedded stack: the Rivya emulator and a local S3 server (moto), for the demo, `dev` and runs with no key.

Nothing here is billed and nothing leaves the machine. Entering the stack points this process's
environment (and so every process it starts) at it. moto keeps objects in memory, so the stack
saves its bucket to a folder when it stops and restores it when it starts again: the videos of the
demo are still there when `make dev` opens the UI on the same stack (same ports, same links).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from moto.server import ThreadedMotoServer

from .emulator import ApiKeyConfig, EmulatorConfig, RivyaEmulator
from .storage import make_s3_client

# Not a secret: the key the local emulator accepts. A real key only ever comes from RIVYA_API_KEY.
EMBEDDED_API_KEY = "rvya_sk_local_emulator_key"
EMBEDDED_BUCKET = "rivya-videos"
DEFAULT_PORTS = {"api": 8787, "media": 8788, "s3": 8789}
PUBLIC_READ_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{EMBEDDED_BUCKET}/*"}
    ],
}
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}


def stack_env(api_url: str, s3_url: str) -> dict[str, str]:
    """The environment that points a process at an embedded stack serving on these URLs (say, a worker of `dev`'s)."""
    return {
        **DUMMY_AWS,
        "RIVYA_API_KEY": EMBEDDED_API_KEY,
        "RIVYA_BASE_URL": api_url,
        "RIVYA_ALLOW_LOCAL_MEDIA": "1",
        "AWS_ENDPOINT_URL_S3": s3_url,
        "RIVYA_S3_BUCKET": EMBEDDED_BUCKET,
    }


@dataclass
class EmbeddedStack:
    data_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    emulator_config: EmulatorConfig | None = None
    env: dict[str, str] = field(default_factory=dict)

    def __enter__(self) -> EmbeddedStack:
        config = self.emulator_config or EmulatorConfig(
            api_keys=[ApiKeyConfig(key=EMBEDDED_API_KEY)], queued_seconds=0.5, processing_seconds=1.5
        )
        self._emulator = RivyaEmulator(config, port=self.ports["api"], media_port=self.ports["media"]).start()
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
        self._s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=self.ports["s3"], verbose=False)
        self._s3.start()
        host, port = self._s3.get_host_and_port()
        s3_url = f"http://{host}:{port}"
        self.env = stack_env(self._emulator.base_url, s3_url)
        os.environ.update(self.env)  # this process and the ones it starts (dagster dev, runs) use the stack
        self._client = make_s3_client(endpoint_url=s3_url, region="us-east-1")
        self._client.create_bucket(Bucket=EMBEDDED_BUCKET)
        # The UI's s3_link opens in a browser, which has no AWS credentials; this bucket only listens on 127.0.0.1.
        self._client.put_bucket_policy(Bucket=EMBEDDED_BUCKET, Policy=json.dumps(PUBLIC_READ_POLICY))
        self._restore_bucket()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._save_bucket()
        finally:
            self._s3.stop()
            self._emulator.stop()

    @property
    def emulator(self) -> RivyaEmulator:
        return self._emulator

    @property
    def _mirror(self) -> Path:
        return self.data_dir / "s3" / EMBEDDED_BUCKET

    def _save_bucket(self) -> None:
        for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=EMBEDDED_BUCKET):
            for item in page.get("Contents", []):
                target = self._mirror / item["Key"]
                target.parent.mkdir(parents=True, exist_ok=True)
                self._client.download_file(EMBEDDED_BUCKET, item["Key"], str(target))

    def _restore_bucket(self) -> None:
        if not self._mirror.is_dir():
            return
        for path in sorted(p for p in self._mirror.rglob("*") if p.is_file()):
            self._client.upload_file(str(path), EMBEDDED_BUCKET, path.relative_to(self._mirror).as_posix())
