"""Settings: the TOML schema, its embedded defaults and validation."""
