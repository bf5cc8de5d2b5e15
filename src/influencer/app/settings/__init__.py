"""Settings of every command: frozen dataclasses resolved from defaults, a TOML file and flags."""
