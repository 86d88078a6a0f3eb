"""Ray Serve application for online extraction (see serve/app.py)."""
