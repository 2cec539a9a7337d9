"""What the programs read: calibration profiles, speculation traces, prompt files and
acceptance models (validated at the edge, errors name file, line and field)."""
