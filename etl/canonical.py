"""Canonical record shapes: what every feed is reduced to before mapping.

A new source is a profile (or a parser) that emits these Arrow tables; everything after
extraction (landing, mapping, building, the report) only knows these shapes. Every record
carries its provenance: feed, source file and line (or message/instance position).
"""

from __future__ import annotations

import pyarrow as pa

PROVENANCE = [
    pa.field("feed", pa.string(), nullable=False),
    pa.field("source_file", pa.string(), nullable=False),
    pa.field("source_line", pa.int64(), nullable=False),
]

PERSON = pa.schema(
    [
        pa.field("person_key", pa.string(), nullable=False),  # keyed HMAC, never the MRN
        pa.field("birth_datetime", pa.timestamp("us")),
        pa.field("death_datetime", pa.timestamp("us")),
        pa.field("gender_code", pa.string()),
        pa.field("gender_vocabulary", pa.string()),
        pa.field("race_code", pa.string()),
        pa.field("race_vocabulary", pa.string()),
        pa.field("ethnicity_code", pa.string()),
        pa.field("ethnicity_vocabulary", pa.string()),
        pa.field("state", pa.string()),
        pa.field("zip3", pa.string()),  # HIPAA safe harbour: 3-digit ZIP at most
        pa.field("care_site_key", pa.string()),
        pa.field("provider_key", pa.string()),
        *PROVENANCE,
    ]
)

VISIT = pa.schema(
    [
        pa.field("visit_key", pa.string(), nullable=False),
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("class_code", pa.string()),
        pa.field("class_vocabulary", pa.string()),
        pa.field("start_datetime", pa.timestamp("us"), nullable=False),
        pa.field("end_datetime", pa.timestamp("us")),
        pa.field("provider_key", pa.string()),
        pa.field("care_site_key", pa.string()),
        *PROVENANCE,
    ]
)

EVENT = pa.schema(
    [
        pa.field("event_key", pa.string(), nullable=False),  # stable identity of the record
        pa.field("record_set", pa.string(), nullable=False),  # e.g. conditions, medications
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("visit_key", pa.string()),
        pa.field("code", pa.string()),
        pa.field("vocabulary_id", pa.string()),
        pa.field("default_domain", pa.string(), nullable=False),
        pa.field("keep_domain", pa.bool_(), nullable=False),  # never re-routed by concept
        pa.field("type_concept_id", pa.int32(), nullable=False),
        pa.field("start_datetime", pa.timestamp("us"), nullable=False),
        pa.field("end_datetime", pa.timestamp("us")),
        pa.field("value_as_number", pa.float64()),
        pa.field("value_as_string", pa.string()),
        pa.field("value_code", pa.string()),
        pa.field("value_vocabulary", pa.string()),
        pa.field("unit_code", pa.string()),
        pa.field("unit_vocabulary", pa.string()),
        pa.field("range_low", pa.float64()),
        pa.field("range_high", pa.float64()),
        # comparator of a numeric result ('<', '<=', '=', '>=', '>'): operator_concept_id
        pa.field("operator", pa.string()),
        # abnormal flag or other qualifier as sent (HL7 OBX-8): qualifier_source_value
        pa.field("qualifier", pa.string()),
        pa.field("quantity", pa.float64()),
        pa.field("device_identifier", pa.string()),
        pa.field("provider_key", pa.string()),
        *PROVENANCE,
    ]
)

CARE_SITE = pa.schema(
    [
        pa.field("care_site_key", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        pa.field("state", pa.string()),
        pa.field("zip3", pa.string()),
        *PROVENANCE,
    ]
)

PROVIDER = pa.schema(
    [
        pa.field("provider_key", pa.string(), nullable=False),
        pa.field("care_site_key", pa.string()),
        pa.field("specialty_code", pa.string()),
        pa.field("specialty_vocabulary", pa.string()),
        pa.field("gender_code", pa.string()),
        pa.field("gender_vocabulary", pa.string()),
        *PROVENANCE,
    ]
)

PAYER = pa.schema(
    [
        pa.field("payer_key", pa.string(), nullable=False),
        pa.field("name", pa.string()),
        *PROVENANCE,
    ]
)

PAYER_PLAN = pa.schema(
    [
        pa.field("plan_key", pa.string(), nullable=False),
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("payer_key", pa.string()),
        pa.field("start_datetime", pa.timestamp("us"), nullable=False),
        pa.field("end_datetime", pa.timestamp("us")),
        *PROVENANCE,
    ]
)

CLAIM = pa.schema(
    [
        pa.field("claim_key", pa.string(), nullable=False),
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("visit_key", pa.string()),
        pa.field("start_datetime", pa.timestamp("us")),
        *PROVENANCE,
    ]
)

COST_LINE = pa.schema(
    [
        pa.field("line_key", pa.string(), nullable=False),
        pa.field("claim_key", pa.string(), nullable=False),
        pa.field("kind", pa.string()),  # charge | payment | other
        pa.field("amount", pa.float64()),
        pa.field("currency_concept_id", pa.int32()),
        *PROVENANCE,
    ]
)

# Two source keys declared the same patient (an EHR merge file, an HL7 ADT^A40): the
# records of `from_person_key` move to `into_person_key`, tonight and on later nights.
PERSON_MERGE = pa.schema(
    [
        pa.field("from_person_key", pa.string(), nullable=False),
        pa.field("into_person_key", pa.string(), nullable=False),
        *PROVENANCE,
    ]
)

# A record the source withdrew (a delta delivery's deleted row, a cancelled lab result):
# in a delta feed it removes the record of that key from the state.
DELETION = pa.schema(
    [
        pa.field("shape", pa.string(), nullable=False),
        pa.field("record_key", pa.string(), nullable=False),
        *PROVENANCE,
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("record_set", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        *PROVENANCE,
    ]
)

# A PACS feed's image series, one row per instance file (DICOM headers only): rows
# sharing image_key are the instances of one series; the build makes one
# image_occurrence per image_key from its first instance (instance_number 1) and traces
# every instance file to it.
IMAGE = pa.schema(
    [
        pa.field("image_key", pa.string(), nullable=False),  # pseudonym of the series UID
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("visit_key", pa.string()),  # no DICOM tag carries it: matched in the build
        pa.field("procedure_event_key", pa.string(), nullable=False),  # the study's event
        pa.field("study_uid", pa.string(), nullable=False),  # or its pseudonym (hash_uids)
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("modality_code", pa.string()),
        pa.field("modality_vocabulary", pa.string()),
        pa.field("anatomic_site_code", pa.string()),
        pa.field("anatomic_site_vocabulary", pa.string()),
        pa.field("start_datetime", pa.timestamp("us"), nullable=False),
        pa.field("local_path", pa.string()),
        pa.field("wadors_uri", pa.string()),
        pa.field("instance_number", pa.int64(), nullable=False),  # 1 = the series' first
        *PROVENANCE,
    ]
)

# A coded finding of a structured report or segmentation, linked to its image series;
# the finding itself is an event (feature_key = its event_key).
IMAGE_FEATURE = pa.schema(
    [
        pa.field("feature_key", pa.string(), nullable=False),
        pa.field("image_key", pa.string(), nullable=False),
        pa.field("person_key", pa.string(), nullable=False),
        pa.field("anatomic_site_code", pa.string()),
        pa.field("anatomic_site_vocabulary", pa.string()),
        pa.field("alg_system", pa.string()),
        pa.field("alg_datetime", pa.timestamp("us")),
        *PROVENANCE,
    ]
)

SHAPES: dict[str, pa.Schema] = {
    "person": PERSON,
    # persons a feed can only infer (a lab result's PID when the site's policy creates
    # unknown patients): used only when no feed delivers the person itself
    "derived_person": PERSON,
    "visit": VISIT,
    "event": EVENT,
    "care_site": CARE_SITE,
    "provider": PROVIDER,
    "payer": PAYER,
    "payer_plan": PAYER_PLAN,
    "claim": CLAIM,
    "cost_line": COST_LINE,
    "quarantine": QUARANTINE,
    "image": IMAGE,
    "image_feature": IMAGE_FEATURE,
    "person_merge": PERSON_MERGE,
    "deletion": DELETION,
}

# The record set of the procedure events a DICOM feed lands for its studies (an image's
# `procedure_event_key` is one of their keys)
IMAGING_STUDY_SET = "imaging_studies"

# The column that identifies a record of each shape: a delta delivery's record replaces
# the state's record of the same key.
RECORD_KEYS: dict[str, str] = {
    "person": "person_key",
    "derived_person": "person_key",
    "visit": "visit_key",
    "event": "event_key",
    "care_site": "care_site_key",
    "provider": "provider_key",
    "payer": "payer_key",
    "payer_plan": "plan_key",
    "claim": "claim_key",
    "cost_line": "line_key",
    "image": "image_key",
    "image_feature": "feature_key",
    "person_merge": "from_person_key",
}
