"""Data sets: the layouts the toolkit reads (registered by name, see registry.py), their class
lists, and the synthetic demo data generator."""
