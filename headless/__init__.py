"""The pack without ComfyUI: the `fluxbridge` command, the workflow checker and runner with stand-ins of
the native nodes the examples use, the demo, and the tiny random models it and the tests build."""
