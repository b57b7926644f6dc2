"""Plain library: reading, detection, layout tables, loading, writing, LoRA (no ComfyUI)."""
