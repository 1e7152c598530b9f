"""The catalog of known models: one TOML file each, read by mflux.catalog."""
