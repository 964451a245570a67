"""rivya_pipeline: video briefs in, finished videos in S3 out, driven by Dagster."""
