"""Clinical workflow in: orders from the RIS (HL7 v2 over MLLP) that give a study its priority and context.

hl7v2.py         HL7 v2 ER7 messages: tolerant parsing, escapes, acknowledgements (MSH-15 / MSA / ERR)
orders.py        an order read from ORM^O01 / OMI^O23, and its durable store in the system of record
hl7_listener.py  the MLLP server: each message stored, then acknowledged; malformed ones rejected
"""
