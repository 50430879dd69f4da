"""What an orchestrator (the Airflow DAGs in dags/) needs from the library: the names the
DAGs share, the site configuration resolved from Airflow Variables and a Connection, and
which errors are worth a retry.

Importing this module is cheap (no database driver, no Arrow): DAG files import it at
parse time. Airflow itself is imported only inside `site_from_airflow`, in a task.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etl.config import ConfigError, SiteConfig, load_config

SITE_CONFIG_VARIABLE = "omop_etl_site_config"  # path of the site YAML
WORKDIR_VARIABLE = "omop_etl_workdir"  # where runs/RUN_ID/ go (default: the YAML's folder)
PSEUDONYM_SECRET_VARIABLE = "omop_etl_pseudonym_secret"  # used when the env var is unset
WAREHOUSE_CONNECTION = "omop_warehouse"  # overrides the YAML's `warehouse` when defined
# The same settings from the environment, for runs outside Airflow or without Variables.
SITE_CONFIG_ENV = "OMOP_ETL_SITE_CONFIG"
WORKDIR_ENV = "OMOP_ETL_WORKDIR"
# The schedule is read when the DAG file is parsed, so only from the environment: the
# Airflow Variable `omop_etl_nightly_cron` set through AIRFLOW_VAR_OMOP_ETL_NIGHTLY_CRON.
CRON_ENV = "AIRFLOW_VAR_OMOP_ETL_NIGHTLY_CRON"
DEFAULT_CRON = "0 2 * * *"
SITE_ENV = "OMOP_ETL_SITE"  # the <site> of the published CDM's Asset URI
# Errors worth a retry (dotted paths, for Airflow's ExceptionRetryPolicy): the database is
# unreachable or restarting, or another run holds the warehouse lock. Anything else (bad
# input, a refused gate) fails at once.
TRANSIENT_ERRORS = [
    "sqlalchemy.exc.OperationalError",
    "sqlalchemy.exc.InterfaceError",
    "builtins.ConnectionError",
    "builtins.TimeoutError",
    "etl.pipeline.lock.LockBusy",  # another run holds the warehouse: try again later
]


def nightly_cron() -> str:
    return os.environ.get(CRON_ENV) or DEFAULT_CRON


def cdm_asset_uri(site: str | None = None) -> str:
    """The Airflow Asset of the published CDM: omop://<site>/cdm."""
    return f"omop://{site or os.environ.get(SITE_ENV) or 'local'}/cdm"


def warehouse_url(
    conn_type: str | None,
    host: str | None = None,
    login: str | None = None,
    password: str | None = None,
    port: int | None = None,
    schema: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """A warehouse URL from an Airflow Connection's fields.

    `extra.url` wins (any URL `open_warehouse` accepts); a `postgres` connection becomes
    postgresql+psycopg://login:password@host:port/schema (Airflow's `schema` field holds
    the database); a `duckdb` connection names its file in `host` (or `extra.path`).
    """
    extra = extra or {}
    if extra.get("url"):
        return str(extra["url"])
    if conn_type in ("postgres", "postgresql"):
        import sqlalchemy as sa

        url = sa.engine.URL.create(
            "postgresql+psycopg",
            username=login or None,
            password=password or None,
            host=host or None,
            port=port or None,
            database=schema or None,
        )
        return url.render_as_string(hide_password=False)
    if conn_type == "duckdb":
        path = extra.get("path") or host or schema
        if not path:
            raise ConfigError("duckdb connection: give the file in host or extra.path")
        return f"duckdb:///{path}"
    raise ConfigError(
        f"connection type {conn_type!r}: use postgres, duckdb, or an extra 'url' field"
    )


@dataclass
class Site:
    """A resolved site: its configuration and the folder its runs are written to."""

    cfg: SiteConfig
    workdir: Path


def load_site(
    config_path: str | Path | None,
    workdir: str | Path | None = None,
    warehouse: str | None = None,
) -> Site:
    """The site YAML at `config_path`, its warehouse replaced by `warehouse` when given."""
    if not config_path:
        raise ConfigError(
            f"no site config: set the Airflow Variable {SITE_CONFIG_VARIABLE}"
            f" (or ${SITE_CONFIG_ENV}) to the path of the site YAML"
        )
    path = Path(config_path)
    cfg = load_config(path)
    if warehouse:
        cfg = SiteConfig.model_validate({**cfg.model_dump(), "warehouse": warehouse})
    return Site(cfg, Path(workdir) if workdir else path.resolve().parent)


def site_from_airflow() -> Site:
    """The site as Airflow configures it (call inside a task): Variables
    `omop_etl_site_config` and `omop_etl_workdir`, Connection `omop_warehouse`, and the
    pseudonymisation key from the Variable `omop_etl_pseudonym_secret` when the
    environment variable the config names is unset."""
    from airflow.sdk import Connection, Variable
    from airflow.sdk.exceptions import AirflowNotFoundException

    config_path = Variable.get(SITE_CONFIG_VARIABLE, default=None) or os.environ.get(
        SITE_CONFIG_ENV
    )
    workdir = Variable.get(WORKDIR_VARIABLE, default=None) or os.environ.get(WORKDIR_ENV)
    try:
        conn = Connection.get(WAREHOUSE_CONNECTION)
    except AirflowNotFoundException:
        conn = None
    url = None
    if conn is not None:
        url = warehouse_url(
            conn.conn_type,
            conn.host,
            conn.login,
            conn.password,
            conn.port,
            conn.schema,
            conn.extra_dejson,
        )
    site = load_site(config_path, workdir, url)
    if not os.environ.get(site.cfg.pseudonym_key_env):
        secret = Variable.get(PSEUDONYM_SECRET_VARIABLE, default=None)
        if secret:  # masked in task logs: the variable's name contains "secret"
            os.environ[site.cfg.pseudonym_key_env] = secret
    return site


def cdm_asset() -> Any:
    """The Airflow Asset both DAGs update when they publish (`omop_cdm`)."""
    from airflow.sdk import Asset

    return Asset(name="omop_cdm", uri=cdm_asset_uri())


def retry_policy() -> Any:
    """Retry transient errors (TRANSIENT_ERRORS) only; fail at once on anything else."""
    from airflow.sdk import ExceptionRetryPolicy, RetryAction, RetryRule

    return ExceptionRetryPolicy(
        rules=[RetryRule(exception=TRANSIENT_ERRORS, action=RetryAction.RETRY)],
        default=RetryAction.FAIL,
    )


def resume_run(etl_run: str) -> Any:
    """The pipeline run `etl_run` (a NightlyRun), from the site Airflow configures."""
    from etl.pipeline.steps import NightlyRun

    site = site_from_airflow()
    return NightlyRun.resume(site.cfg, site.workdir, etl_run)
