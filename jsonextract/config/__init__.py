"""Typed settings: YAML files and `key=value` overrides into frozen dataclasses, each setting declared once with its
default and a one-line description that `--help` prints (`core`), and one module per job's settings."""
