"""What every engine reports, and how it is written: events, hit counts, text and JSON lines."""
