"""Stub of ComfyUI's `comfy_api` package (tests only)."""
