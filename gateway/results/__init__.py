"""Encode: the analysis as DICOM objects (SR TID 1500, GSPS, SEG, rejection KO), the header hygiene every copied
attribute passes, and the encoder process pool."""
