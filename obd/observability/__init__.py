"""What obd tells about itself while it works: counters and latencies, progress on long work."""
