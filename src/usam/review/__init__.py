"""Reviewed annotations coming back from Label Studio and CVAT, for fine-tuning the head."""
