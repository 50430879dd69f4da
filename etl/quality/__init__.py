"""The quality gate: checks generated from the CDM spec and the OHDSI DQD catalogue."""
