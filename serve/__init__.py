"""bsbr-serve: the Ray Serve application, HTTP API, sessions, metrics and CLI.

Layout (text-embeddings-inference style):
  schemas.py      request/response models: the API's documentation
  api.py          FastAPI routes behind @serve.ingress (HTTP only)
  engine.py       tokenising, pages, batched steps, sessions (no HTTP)
  store.py        session checkpoint store interface + Ray actor / memory stores
  router.py       session-affinity request router for the model deployments
  deployments.py  one Serve deployment per model, each replica one Engine
  app.py          build_app(args) for `import_path: serve.app:build_app`
  config.py       AppConfig, the validated `args`
  metrics.py      the docs/architecture.md 4 metrics (ray.serve.metrics)
  errors.py       typed errors, one HTTP status each
  cli.py          the bsbr-serve command
"""
