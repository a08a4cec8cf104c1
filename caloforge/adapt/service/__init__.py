"""The adaptation service: adaptation jobs requested over HTTP (``caloforge serve``; docs/service.md).

Modules: ``config`` (ServiceConfig), ``db`` (SQLAlchemy tables, Alembic migrations run on open), ``store``
(JobStore), ``auth`` (bearer tokens), ``validation`` (a request → a validated job spec), ``schemas`` (the
request/response models), ``app`` (the FastAPI app: the only module importing fastapi), ``client`` (a small
Python client), ``cli`` (``caloforge serve``). Nothing outside this package imports it except the CLIs.
"""
