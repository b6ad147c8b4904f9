"""Report: FHIR and HL7 results, STAT and failure notifications, their dispatcher."""
