"""NOVA deployment runtime: `NOVARunner` over built engines; `runtime.reference` is the eager baseline."""


def __getattr__(name: str):
    # Lazy, so `import runtime` stays light (and torch-free) until the runner is used.
    if name in ("NOVARunner", "RunnerOutput"):
        from runtime import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
