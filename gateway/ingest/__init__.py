"""Receive -> spool -> assemble: the DICOM receiver, the durable spool and study assembly."""
