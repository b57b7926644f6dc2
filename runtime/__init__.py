"""What the ComfyUI nodes and the headless runner share at run time: the host adapter (the only module
that imports ComfyUI) with its standalone V3 `io` stand-in, the model objects and their load cache, and the
node input specs (widget checks, name rules)."""
