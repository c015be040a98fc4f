"""Training: paired data, generator setups and their losses."""
