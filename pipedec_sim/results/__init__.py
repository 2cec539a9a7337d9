"""What the programs write: per-request metrics and summaries, Chrome/Perfetto timelines."""
