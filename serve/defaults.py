"""A deployment's defaults, shared by `python -m serve` and `serve.app.build_app` (Ray-free, so `--help`
answers at once)."""

NUM_CPUS = 1.0  # per replica
MAX_ONGOING_REQUESTS = 32  # per replica: at least twice the built batch, so the next batch fills while one runs
MAX_QUEUED_REQUESTS = 64  # per deployment, waiting for a replica; beyond it: 503 with Retry-After
RETRY_AFTER_S = 1  # the Retry-After of that 503 (whole seconds, as HTTP writes it)
BATCH_WAIT_S = 0.02  # longest wait for a batch to fill
DEADLINE_S = {"image": 120.0, "video": 900.0}  # from arrival at the ingress to the last byte generated
HEALTH_PROBE_S = 1.0  # a model that does not answer /healthz's probe within this is down
MAX_JOBS = 64  # video jobs the ingress holds at once, queued, running or finished
JOB_KEEP_S = 3600.0  # how long a finished video job (and its mp4) is kept
