"""Write check results in the OHDSI Data Quality Dashboard results layout.

The JSON file DQD writes (and its viewer and OHDSI Ares read): `startTimestamp`,
`endTimestamp`, `executionTime`, `CheckResults` (one object per check: checkName,
checkLevel, cdmTableName, cdmFieldName, conceptId, numViolatedRows, pctViolatedRows as a
proportion, numDenominatorRows, thresholdValue, failed, passed, isError, notApplicable,
category, subcategory, context, ...), `Metadata` (the cdm_source row) and `Overview`
(counts per category), with scalars in one-element arrays as DQD's R writer emits them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from etl.quality.checks import check_types

DQD_VERSION = "2.8.4 (catalogue; run by omop-etl)"


def dqd_results(
    checks: list[dict[str, Any]], started: dt.datetime, ended: dt.datetime,
    cdm_source: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    types = check_types()
    results = []
    for n, c in enumerate(checks):
        total = c["total_rows"]
        level = types[c["name"]].level if c["name"] in types else "TABLE"
        error = c.get("error")
        results.append(
            {
                "checkId": c.get("key", str(n)),
                "checkName": c["name"],
                "checkLevel": level,
                "checkDescription": c.get("description", ""),
                "cdmTableName": c["table"].upper(),
                "cdmFieldName": (c.get("field") or "").upper() or None,
                "conceptId": c.get("concept_id"),
                "unitConceptId": c.get("unit_concept_id"),
                "numViolatedRows": c["violating_rows"],
                "pctViolatedRows": c["violating_rows"] / total if total else 0.0,
                "numDenominatorRows": total,
                "thresholdValue": c["threshold_pct"],
                "category": c["category"],
                "subcategory": c.get("subcategory", ""),
                "context": c.get("context", ""),
                "failed": 0 if c["passed"] else 1,
                "passed": 1 if c["passed"] else 0,
                "isError": 1 if error else 0,
                "error": error,
                "notApplicable": 1 if total == 0 and not error else 0,
                "notApplicableReason": "no rows to check" if total == 0 and not error else None,
                "severity": c["severity"],
            }
        )

    def count(pred) -> int:  # type: ignore[no-untyped-def]
        return sum(1 for r in results if pred(r))

    overview: dict[str, list[float]] = {
        "countTotal": [len(results)],
        "countThresholdFailed": [count(lambda r: r["failed"] and not r["isError"])],
        "countErrorFailed": [count(lambda r: r["isError"])],
        "countOverallFailed": [count(lambda r: r["failed"])],
        "countPassed": [count(lambda r: r["passed"])],
    }
    total = len(results) or 1
    overview["percentPassed"] = [round(100 * overview["countPassed"][0] / total)]
    overview["percentFailed"] = [round(100 * overview["countOverallFailed"][0] / total)]
    for cat in ("Plausibility", "Conformance", "Completeness"):
        in_cat = [r for r in results if r["category"] == cat]
        failed = sum(r["failed"] for r in in_cat)
        overview[f"countTotal{cat}"] = [len(in_cat)]
        overview[f"countFailed{cat}"] = [failed]
        overview[f"countPassed{cat}"] = [len(in_cat) - failed]
    src = cdm_source or {}
    metadata = {
        "cdmSourceName": src.get("cdm_source_name"),
        "cdmSourceAbbreviation": src.get("cdm_source_abbreviation"),
        "cdmHolder": src.get("cdm_holder"),
        "sourceDescription": src.get("source_description"),
        "sourceDocumentationReference": src.get("source_documentation_reference"),
        "cdmEtlReference": src.get("cdm_etl_reference"),
        "sourceReleaseDate": str(src.get("source_release_date") or ""),
        "cdmReleaseDate": str(src.get("cdm_release_date") or ""),
        "cdmVersion": src.get("cdm_version"),
        "vocabularyVersion": src.get("vocabulary_version"),
        "dqdVersion": DQD_VERSION,
    }
    return {
        "startTimestamp": started.isoformat(sep=" ", timespec="seconds"),
        "endTimestamp": ended.isoformat(sep=" ", timespec="seconds"),
        "executionTime": f"{(ended - started).total_seconds():.0f} secs",
        "CheckResults": results,
        "Metadata": [metadata],
        "Overview": overview,
    }
