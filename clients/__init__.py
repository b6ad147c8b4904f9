"""Protocol clients: Triton (async gRPC, system shared memory), DICOM SCU (C-STORE, C-ECHO) and HL7 MLLP."""
