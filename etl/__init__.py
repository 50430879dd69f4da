"""omop-etl: an OMOP CDM v5.4 ETL framework for hospitals."""

__version__ = "0.1.0"
