"""Scoring: field-level `metrics`, grounding and `calibration` metrics, scoring files (`score`), the run `report`,
the static review page (`view`) and the evaluate job (`job`)."""
