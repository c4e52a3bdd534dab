"""NOVA behind Ray Serve: `serve.app.build_app(engine_folders)` and `python -m serve` (see serve/README.md)."""
