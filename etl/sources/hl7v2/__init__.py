"""The lab feed: HL7 v2 result messages (ORU^R01) read into canonical lab events."""

from etl.sources.hl7v2.extract import extract_hl7, input_files

__all__ = ["extract_hl7", "input_files"]
