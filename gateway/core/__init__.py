"""The kernel every other part builds on: errors, domain types and enums, durable file I/O, codes and terminology, log safety. Imports nothing of the gateway."""
