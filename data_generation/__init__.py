"""Dataset generation: ``python data_generation/generate_<task>.py`` (see generate.py)."""
