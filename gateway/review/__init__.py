"""The radiologist in the loop: verdicts on AI findings, final reports read against the AI, drift of a model's
acceptance and scores, and the governance report built from them (all on the system of record)."""
