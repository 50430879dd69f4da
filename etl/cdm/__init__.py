"""The CDM: its specification, generated schema (DDL) and, later, the table builders."""
