"""One small interface over the two warehouse engines: DuckDB (embedded) and PostgreSQL."""

from etl.warehouse.base import Warehouse, open_warehouse

__all__ = ["Warehouse", "open_warehouse"]
