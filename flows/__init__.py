"""Prefect orchestration of the DVC pipeline (flow and deployment `sft-dpo`): see docs/prefect.md."""
