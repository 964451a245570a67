"""The Dagster layer: assets, checks, sensor, schedule and resources (thin; the work lives below)."""
