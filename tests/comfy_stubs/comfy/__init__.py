"""Stub of ComfyUI's `comfy` package (tests only)."""
