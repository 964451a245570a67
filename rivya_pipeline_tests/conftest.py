"""Shared fixtures: each real boundary (Rivya emulator over HTTP, S3 server over HTTP) lives in its own module."""

pytest_plugins = [
    "rivya_pipeline_tests.fixtures_emulator",
    "rivya_pipeline_tests.fixtures_ledger",
    "rivya_pipeline_tests.fixtures_s3",
    "rivya_pipeline_tests.fixtures_pipeline",
    "rivya_pipeline_tests.fixtures_postgres",
]
