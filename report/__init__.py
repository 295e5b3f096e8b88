"""The HTML run report (`run_pipeline.py report`): page.py lays it out, pictures.py draws."""
